//! Identity resolution: which CRM contact wrote a contribution.
//!
//! In order: the link table (an identity already resolved), the e-mail the
//! platform gave, the platform handle kept in the contact's per-platform
//! handle property, and last a new contact (`unknown_authors = "create"`)
//! or nothing (`"skip"`). Every resolution is stored as a link, so each
//! author costs CRM look-ups once.

use std::collections::HashMap;

use tributary_sdk::{ContactLookup, ContactUpsert, Contribution, Crm, CrmError, RecordOutcome};

use crate::{
    config::UnknownAuthors,
    state::{StateError, StateStore},
};

/// Who wrote one contribution, as far as the CRM is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Contact(String),
    /// Unknown author and `unknown_authors = "skip"`.
    Skip(String),
    /// The CRM refused to create the contact; its own message.
    Rejected(String),
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Crm(#[from] CrmError),
    #[error(transparent)]
    State(#[from] StateError),
}

fn upsert_for(c: &Contribution, email: Option<String>) -> ContactUpsert {
    ContactUpsert {
        identity: c.identity_key(),
        email,
        platform: c.platform.clone(),
        handle: c.author.handle.clone().or_else(|| Some(c.author.id.clone())),
        display_name: c.author.display_name.clone(),
        profile_url: c.author.profile_url.clone(),
    }
}

/// Resolves the authors of a batch; one answer per contribution, in order.
pub async fn resolve(
    store: &dyn StateStore,
    crm: &dyn Crm,
    mode: UnknownAuthors,
    contributions: &[&Contribution],
) -> Result<Vec<Resolution>, IdentityError> {
    // One resolution per distinct author identity.
    let mut by_identity: HashMap<String, Resolution> = HashMap::new();
    let mut unresolved: Vec<&Contribution> = Vec::new();
    for c in contributions {
        let identity = c.identity_key();
        if c.author.id.trim().is_empty() {
            by_identity.insert(identity, Resolution::Skip("the platform names no author".into()));
            continue;
        }
        if by_identity.contains_key(&identity) || unresolved.iter().any(|u| u.identity_key() == identity) {
            continue;
        }
        match store.identity(&identity).await? {
            Some(contact) => {
                by_identity.insert(identity, Resolution::Contact(contact));
            }
            None => unresolved.push(c),
        }
    }

    let email_of =
        |c: &Contribution| c.author.email.as_ref().map(|e| e.trim().to_lowercase()).filter(|e| !e.is_empty());
    let (with_email, without_email): (Vec<&Contribution>, Vec<&Contribution>) =
        unresolved.into_iter().partition(|c| email_of(c).is_some());

    // E-mail: an upsert by e-mail finds or creates in one call.
    match mode {
        UnknownAuthors::Create if !with_email.is_empty() => {
            let inputs: Vec<ContactUpsert> = with_email.iter().map(|c| upsert_for(c, email_of(c))).collect();
            let outcomes = crm.upsert_contacts(&inputs).await?;
            for (c, outcome) in with_email.iter().zip(outcomes) {
                let resolution = match outcome {
                    RecordOutcome::Done(contact) => {
                        store.link_identity(&c.identity_key(), &contact, "email").await?;
                        Resolution::Contact(contact)
                    }
                    RecordOutcome::Rejected(message) => Resolution::Rejected(message),
                };
                by_identity.insert(c.identity_key(), resolution);
            }
        }
        _ => {
            for c in &with_email {
                let Some(email) = email_of(c) else { continue };
                let resolution = match crm.find_contact(&ContactLookup::Email(email)).await? {
                    Some(contact) => {
                        store.link_identity(&c.identity_key(), &contact, "email").await?;
                        Resolution::Contact(contact)
                    }
                    None => Resolution::Skip("unknown author (no CRM contact with this e-mail)".into()),
                };
                by_identity.insert(c.identity_key(), resolution);
            }
        }
    }

    // Handle: look for a contact that carries it, else create by identity.
    let mut to_create: Vec<&Contribution> = Vec::new();
    for c in without_email {
        let handle = c.author.handle.clone().unwrap_or_else(|| c.author.id.clone());
        let lookup = ContactLookup::Handle { platform: c.platform.clone(), handle };
        match crm.find_contact(&lookup).await? {
            Some(contact) => {
                store.link_identity(&c.identity_key(), &contact, "handle").await?;
                by_identity.insert(c.identity_key(), Resolution::Contact(contact));
            }
            None if mode == UnknownAuthors::Create => to_create.push(c),
            None => {
                by_identity.insert(
                    c.identity_key(),
                    Resolution::Skip("unknown author (no CRM contact with this handle)".into()),
                );
            }
        }
    }
    if !to_create.is_empty() {
        let inputs: Vec<ContactUpsert> = to_create.iter().map(|c| upsert_for(c, None)).collect();
        let outcomes = crm.upsert_contacts(&inputs).await?;
        for (c, outcome) in to_create.iter().zip(outcomes) {
            let resolution = match outcome {
                RecordOutcome::Done(contact) => {
                    store.link_identity(&c.identity_key(), &contact, "created").await?;
                    Resolution::Contact(contact)
                }
                RecordOutcome::Rejected(message) => Resolution::Rejected(message),
            };
            by_identity.insert(c.identity_key(), resolution);
        }
    }

    Ok(contributions
        .iter()
        .map(|c| {
            by_identity
                .get(&c.identity_key())
                .cloned()
                .unwrap_or_else(|| Resolution::Rejected("author could not be resolved".into()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use tributary_crm::file::{FileCrm, FileCrmConfig};
    use tributary_sdk::{Author, ContactLookup};

    use super::*;
    use crate::state::SqliteStore;

    fn by(platform: &str, id: &str, handle: &str, email: Option<&str>) -> Contribution {
        let mut c = tributary_demo::DemoSource::new("s", Default::default()).contribution(0);
        c.platform = platform.into();
        c.author = Author {
            id: id.into(),
            handle: Some(handle.into()),
            display_name: Some(handle.into()),
            email: email.map(str::to_owned),
            profile_url: None,
        };
        c
    }

    async fn check(mode: UnknownAuthors, contributions: &[Contribution], expected: &[&str]) -> (FileCrm, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let crm = FileCrm::new(FileCrmConfig { path: dir.path().join("crm.json") }).unwrap();
        // Known to the CRM beforehand: ada by e-mail, and bo's forum handle.
        let known = [
            ContactUpsert {
                identity: "crm:1".into(),
                email: Some("ada@example.com".into()),
                platform: "crm".into(),
                handle: None,
                display_name: None,
                profile_url: None,
            },
            ContactUpsert {
                identity: "crm:2".into(),
                email: None,
                platform: "forum".into(),
                handle: Some("bo".into()),
                display_name: None,
                profile_url: None,
            },
        ];
        crm.upsert_contacts(&known).await.unwrap();
        let refs: Vec<&Contribution> = contributions.iter().collect();
        let got = resolve(&store, &crm, mode, &refs).await.unwrap();
        let got: Vec<String> = got
            .iter()
            .map(|r| match r {
                Resolution::Contact(id) => format!("contact {id}"),
                Resolution::Skip(_) => "skip".into(),
                Resolution::Rejected(message) => format!("rejected {message}"),
            })
            .collect();
        assert_eq!(got, expected);
        (crm, store)
    }

    #[tokio::test]
    async fn resolution_goes_link_email_handle_then_create_or_skip() {
        let contributions = [
            by("support", "s1", "ada", Some("ADA@example.com")), // e-mail, case-insensitive
            by("forum", "f2", "bo", None),                       // handle property
            by("forum", "f3", "cy", None),                       // unknown
            by("forum", "f3", "cy", None),                       // the same author again
            by("rss", "", "", None),                             // no author at all
        ];
        let (crm, store) = check(
            UnknownAuthors::Create,
            &contributions,
            &["contact 1", "contact 2", "contact 3", "contact 3", "skip"],
        )
        .await;
        assert_eq!(store.identity("forum:f3").await.unwrap().as_deref(), Some("3"), "the link is kept");
        let found =
            crm.find_contact(&ContactLookup::Handle { platform: "forum".into(), handle: "cy".into() }).await.unwrap();
        assert_eq!(found.as_deref(), Some("3"), "a created contact carries the handle");

        check(UnknownAuthors::Skip, &contributions, &["contact 1", "contact 2", "skip", "skip", "skip"]).await;
    }
}
