//! Alerts to the team: rules in `[alerts.NAME]` matched against delivered
//! contributions, posted to Slack, Microsoft Teams, Mattermost or a generic
//! webhook; at most once per rule and contribution, rate limited.
