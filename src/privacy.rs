//! `tributary forget EMAIL|IDENTITY`: the right to be forgotten.
//!
//! The person is everyone linked to the same contacts as the identities or
//! e-mail named. In order: their digests are remembered (so a poll running
//! meanwhile already drops them), the activities Tributary created are
//! archived or deleted in the CRM (`[privacy] forget_activities`) and the
//! contact's Tributary figures are cleared, then every trace is erased from
//! the state store. A CRM failure stops before the erasure, so running the
//! command again finishes the job.

use serde::Deserialize;
use tributary_sdk::{ContactLookup, Crm, CrmError, RecordOutcome, Rollup};

use crate::{
    identity::{self, IdentityError, Target},
    state::{Erased, StateError, StateStore, forgotten_digest},
};

/// What `forget` does with the CRM activities Tributary created for the person.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ForgetActivities {
    /// Out of the timeline, recoverable in the CRM for its retention period.
    #[default]
    Archive,
    /// Deleted for good where the CRM can (HubSpot: its recycling bin).
    Delete,
}

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the CRM failed; nothing was erased yet, run `tributary forget` again: {0}")]
    Crm(#[from] CrmError),
    #[error("the CRM refused to remove activity {id}: {message}; nothing was erased yet")]
    Refused { id: String, message: String },
}

/// What `forget` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forgotten {
    pub identities: Vec<String>,
    pub contacts: Vec<String>,
    /// Activities archived or deleted in the CRM.
    pub crm_activities: usize,
    pub erased: Erased,
}

pub async fn forget(
    store: &dyn StateStore,
    crm: &dyn Crm,
    target: &str,
    activities: ForgetActivities,
) -> Result<Forgotten, ForgetError> {
    let mut identities: Vec<String> = Vec::new();
    let mut emails: Vec<String> = Vec::new();
    let mut contacts: Vec<String> = Vec::new();
    let mut needles: Vec<String> = Vec::new();
    if target.contains('@') && !target.contains(':') {
        let email = target.trim().to_lowercase();
        identities.extend(store.profiles_by_email(&email).await?.into_iter().map(|p| p.identity));
        if let Some(contact) = crm.find_contact(&ContactLookup::Email(email.clone())).await? {
            contacts.push(contact);
        }
        emails.push(email);
    } else {
        match identity::parse_target(store, crm.kind(), target).await? {
            Target::Identity(identity) => identities.push(identity),
            Target::Contact(contact) => contacts.push(contact),
            Target::Handle { platform, handle } => {
                // Never seen: only an administrator's link can name them.
                identities.push(identity::handle_alias(&platform, &handle));
                needles.push(handle);
            }
        }
    }
    // The person: everyone linked to the same contacts.
    for identity in identities.clone() {
        if let Some(contact) = store.identity(&identity).await? {
            contacts.push(contact);
        }
    }
    contacts.sort();
    contacts.dedup();
    for contact in &contacts {
        identities.extend(store.profiles_of_contact(contact).await?.into_iter().map(|p| p.identity));
    }
    identities.sort();
    identities.dedup();
    let profiles = {
        let mut profiles = Vec::new();
        for identity in &identities {
            profiles.extend(store.profile(identity).await?);
        }
        profiles
    };
    for profile in &profiles {
        emails.extend(profile.email.clone());
        needles.extend(profile.handle.clone());
        needles.push(profile.user_id.clone());
    }
    emails.sort();
    emails.dedup();
    needles.extend(emails.iter().cloned());

    let mut digests: Vec<String> = identities.iter().map(|i| forgotten_digest("identity", i)).collect();
    digests.extend(emails.iter().map(|e| forgotten_digest("email", e)));
    store.remember_forgotten(&digests).await?;

    let mut removed = remove_in_crm(crm, &store.person_activities(&identities, &contacts).await?, activities).await?;
    let erased = store.erase_person(&identities, &emails, &contacts, &needles).await?;
    // Delivered while we were at it: removed too.
    let late: Vec<String> = erased.activity_ids.iter().filter(|id| !removed.contains(id)).cloned().collect();
    if !late.is_empty() {
        removed.extend(remove_in_crm(crm, &late, activities).await?);
    }
    // The contact stays (the CRM is the system of record); Tributary's figures on it go.
    let cleared: Vec<Rollup> = contacts.iter().map(|c| Rollup { contact_id: c.clone(), ..Rollup::default() }).collect();
    if !cleared.is_empty()
        && let Err(error) = crm.update_rollups(&cleared).await
    {
        tracing::warn!(error = %error, "clearing the forgotten person's figures failed");
    }
    tracing::info!(
        identities = identities.len(),
        contacts = contacts.len(),
        activities = removed.len(),
        "person forgotten"
    );
    Ok(Forgotten { identities, contacts, crm_activities: removed.len(), erased })
}

async fn remove_in_crm(crm: &dyn Crm, ids: &[String], mode: ForgetActivities) -> Result<Vec<String>, ForgetError> {
    let mut removed = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(100) {
        let outcomes = match mode {
            ForgetActivities::Archive => crm.archive_activities(chunk).await?,
            ForgetActivities::Delete => crm.delete_activities(chunk).await?,
        };
        for (id, outcome) in chunk.iter().zip(outcomes) {
            match outcome {
                RecordOutcome::Done(()) => removed.push(id.clone()),
                RecordOutcome::Rejected(message) => return Err(ForgetError::Refused { id: id.clone(), message }),
            }
        }
    }
    Ok(removed)
}
