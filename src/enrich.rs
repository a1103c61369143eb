//! Enrichment: the signals a team can act on, added to every contribution
//! before it is stored: clean text, language, sentiment and intent.
//!
//! Intent rule set (first match wins, title and body together):
//! 1. `question`: a question mark, or the text opens with a question word
//!    (how, what, why, when, where, who, which, can, could, does, do, is,
//!    are, should, would anyone, any way).
//! 2. `idea`: a suggestion phrase (feature request, it would be great/nice,
//!    would be nice, please add, suggestion, idea:, wish, could you add,
//!    it'd be great).
//! 3. `complaint`: a complaint word (broken, doesn't work, not working,
//!    crash, bug, error, fail, frustrat, refund, terrible, awful, unusable,
//!    charged twice, disappointed, worst) or sentiment below -0.4.
//! 4. `praise`: a praise word (love, thank, great job, awesome, fantastic,
//!    amazing, excellent, kudos) or sentiment above 0.6.
//! 5. `other`.
//!
//! Questions come first because "how do I fix this crash?" asks for help;
//! ideas before complaints because a suggestion often names the pain it fixes.

use std::sync::OnceLock;

use tributary_sdk::{Contribution, Intent, Signals, text::tidy};

fn analyzer() -> &'static vader_sentiment::SentimentIntensityAnalyzer<'static> {
    static ANALYZER: OnceLock<vader_sentiment::SentimentIntensityAnalyzer<'static>> = OnceLock::new();
    ANALYZER.get_or_init(vader_sentiment::SentimentIntensityAnalyzer::new)
}

/// Texts longer than this are scored on their start: the signal is in the
/// opening, and scoring cost grows with length.
const MAX_SCORED_CHARS: usize = 4_000;

/// Adds language, sentiment and intent; tidies title and body.
pub fn enrich(contribution: &mut Contribution) {
    contribution.body = tidy(&contribution.body);
    if let Some(title) = &contribution.title {
        contribution.title = Some(tidy(title));
    }
    let text = match &contribution.title {
        Some(title) if !title.is_empty() => format!("{title}\n{}", contribution.body),
        _ => contribution.body.clone(),
    };
    let scored: String = text.chars().take(MAX_SCORED_CHARS).collect();
    if contribution.language.is_none() {
        contribution.language = whatlang::detect(&scored)
            .filter(|info| info.is_reliable() || scored.len() > 40)
            .map(|info| info.lang().code().to_owned());
    }
    let sentiment = if scored.trim().is_empty() {
        0.0
    } else {
        analyzer().polarity_scores(&scored).get("compound").copied().unwrap_or(0.0)
    };
    let intent = intent(&scored, sentiment);
    contribution.signals = Some(Signals { sentiment: (sentiment * 1000.0).round() / 1000.0, intent, sentiment_skipped: None });
}

/// The documented rule set above.
pub fn intent(text: &str, sentiment: f64) -> Intent {
    const QUESTION_OPENERS: &[&str] = &[
        "how ",
        "what ",
        "why ",
        "when ",
        "where ",
        "who ",
        "which ",
        "can ",
        "could ",
        "does ",
        "do ",
        "is ",
        "are ",
        "should ",
        "would anyone",
        "any way",
    ];
    const IDEA: &[&str] = &[
        "feature request",
        "it would be great",
        "it would be nice",
        "would be nice",
        "please add",
        "suggestion",
        "idea:",
        "i wish",
        "could you add",
        "it'd be great",
        "would love to see",
    ];
    const COMPLAINT: &[&str] = &[
        "broken",
        "doesn't work",
        "does not work",
        "not working",
        "crash",
        "bug",
        "error",
        "fail",
        "frustrat",
        "refund",
        "terrible",
        "awful",
        "unusable",
        "charged twice",
        "disappointed",
        "worst",
    ];
    const PRAISE: &[&str] = &["love", "thank", "great job", "awesome", "fantastic", "amazing", "excellent", "kudos"];

    let lower = text.to_lowercase();
    let opens_with_question =
        lower.lines().any(|line| QUESTION_OPENERS.iter().any(|q| line.trim_start().starts_with(q)));
    if lower.contains('?') || opens_with_question {
        Intent::Question
    } else if IDEA.iter().any(|p| lower.contains(p)) {
        Intent::Idea
    } else if COMPLAINT.iter().any(|p| lower.contains(p)) || sentiment < -0.4 {
        Intent::Complaint
    } else if PRAISE.iter().any(|p| lower.contains(p)) || sentiment > 0.6 {
        Intent::Praise
    } else {
        Intent::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Intent) {
        let sentiment = analyzer().polarity_scores(text).get("compound").copied().unwrap_or(0.0);
        assert_eq!(intent(text, sentiment), expected, "for {text:?} (sentiment {sentiment})");
    }

    #[test]
    fn intents_follow_the_rule_set() {
        check("How do I export my dashboards to PDF", Intent::Question);
        check("The app crashes, any idea why?", Intent::Question);
        check("Feature request: dark mode for the editor", Intent::Idea);
        check("It would be great to have webhooks", Intent::Idea);
        check("The sync is broken again and we lost a day", Intent::Complaint);
        check("I was charged twice, this is terrible", Intent::Complaint);
        check("Love the new editor, great job team", Intent::Praise);
        check("We're hosting a meetup in Berlin next month", Intent::Other);
    }

    #[test]
    fn enrichment_sets_language_sentiment_and_intent() {
        let mut c = tributary_demo::DemoSource::new("demo", Default::default()).contribution(0);
        c.title = Some("  Love it  ".into());
        c.body = "This is fantastic, thank you so much for the great work on the new release!\n\n\n".into();
        enrich(&mut c);
        let signals = c.signals.clone().unwrap();
        assert_eq!(signals.intent, Intent::Praise);
        assert!(signals.sentiment > 0.5, "{signals:?}");
        assert_eq!(c.language.as_deref(), Some("eng"));
        assert_eq!(c.title.as_deref(), Some("Love it"));
        assert!(!c.body.ends_with('\n'));

        let mut angry = c.clone();
        angry.title = None;
        angry.language = None;
        angry.body = "Terrible. The worst update ever, everything is broken and I hate it.".into();
        enrich(&mut angry);
        let signals = angry.signals.unwrap();
        assert_eq!(signals.intent, Intent::Complaint);
        assert!(signals.sentiment < -0.5, "{signals:?}");
    }
}
