//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Since;

#[derive(Debug, Parser)]
#[command(name = "tributary", version, about = "Brings what customers say in their communities into your CRM")]
pub struct Cli {
    /// The configuration file.
    #[arg(long, short, global = true, env = "TRIBUTARY_CONFIG", default_value = "/etc/tributary/tributary.toml")]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: poll every source on its schedule and deliver to the CRM.
    Run,
    /// Validate the configuration and resolve its secrets (exit 78 on problems).
    Check {
        /// Also try every source's and the CRM's credentials.
        #[arg(long)]
        connect: bool,
    },
    /// One pass of one source, then deliver what it found.
    Sync {
        /// The source's name, as in `[sources.NAME]`.
        source: String,
        /// Go back to this date (2026-01-31 or RFC 3339), ignoring the stored cursor.
        #[arg(long, value_parser = parse_since)]
        since: Option<Since>,
        /// Print what would be written, as JSON lines; store and send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show each source's state, the backlog and the dead letters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, retry or drop contributions the CRM refused.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetters),
    /// CRM housekeeping.
    #[command(subcommand)]
    Crm(CrmCommand),
    /// The identity graph: who is who across communities.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Forget a person: their contributions, identities and raw bodies leave
    /// the state store, the activities Tributary created leave the CRM, and
    /// later polls skip them.
    Forget {
        /// An e-mail, a platform identity (`reddit:u/alice`, `discourse:42`)
        /// or a CRM contact (`hubspot:12345`).
        person: String,
        /// Archive or delete the CRM activities (default: `[privacy] forget_activities`).
        #[arg(long, value_enum)]
        activities: Option<crate::privacy::ForgetActivities>,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Pairs that may be one person, waiting for a decision.
    Pending {
        /// Also show approved and rejected pairs.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// They are one person: their contacts are merged (activities move, none is copied).
    Approve { id: i64 },
    /// They are not: the pair is never queued again.
    Reject { id: i64 },
    /// Link two identities (`reddit:u/alice github:alice`) or an identity
    /// and a CRM contact (`reddit:u/alice hubspot:12345`).
    Link {
        /// Two sides, or none with `--file`.
        #[arg(num_args = 0..=2)]
        sides: Vec<String>,
        /// A file of pairs, one per line; `#` starts a comment.
        #[arg(long, conflicts_with = "sides")]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// List dead letters with the CRM's message.
    List,
    /// Put dead letters back in the outbox.
    Retry {
        /// Dead-letter ids (see `list`).
        ids: Vec<i64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete dead letters for good.
    Drop {
        ids: Vec<i64>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CrmCommand {
    /// Create the custom properties Tributary writes (safe to run twice).
    Setup,
}

fn parse_since(text: &str) -> Result<Since, String> {
    text.parse()
}
