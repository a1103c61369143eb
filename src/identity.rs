//! Identity resolution: which CRM contact wrote a contribution, and the
//! identity graph behind it.
//!
//! Nodes are platform identities (`platform:user id`, with the handle,
//! display name and e-mail last seen, kept by the state store); a link ties
//! one to a CRM contact, and a contact is one person. An unlinked identity
//! is resolved, in order, by: an administrator's link (`tributary identity
//! link`, also to a handle not seen yet), an approved pair whose other side
//! has a contact, a platform's own cross-link (a profile naming the account
//! elsewhere, `Author::links`), the same e-mail seen on another platform, the CRM (an
//! upsert or search by e-mail, then the contact's per-platform handle
//! property), and last a new contact (`unknown_authors = "create"`) or
//! nothing (`"skip"`). Every resolution is stored as a link, so each author
//! costs CRM look-ups once.
//!
//! Weak evidence never merges: a newly linked identity that shares a display
//! name, a similar handle or a website with an identity on another platform
//! of another contact goes to the review queue (`tributary identity pending`).
//! Approving a pair, or linking two identities by hand, merges their
//! contacts in the CRM (the activities move, none is copied) and then here.

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
    /// An administrator's request that cannot be done as asked.
    #[error("{0}")]
    Refused(String),
}

/// The link key of a handle an administrator linked before it was seen.
pub fn handle_alias(platform: &str, handle: &str) -> String {
    format!("{platform}@{}", crate::state::bare_handle(handle).to_lowercase())
}

/// An identity known to the state store only: an administrator's link, an
/// approved pair or the same e-mail seen on another platform.
async fn linked_locally(
    store: &dyn StateStore,
    c: &Contribution,
) -> Result<Option<(String, &'static str)>, StateError> {
    let identity = c.identity_key();
    let mut aliases = vec![handle_alias(&c.platform, &c.author.id)];
    if let Some(handle) = &c.author.handle {
        aliases.push(handle_alias(&c.platform, handle));
    }
    for alias in &aliases {
        if let Some(contact) = store.identity(alias).await? {
            return Ok(Some((contact, "admin")));
        }
    }
    for key in std::iter::once(&identity).chain(&aliases) {
        for partner in store.approved_partners(key).await? {
            if let Some(contact) = store.identity(&partner).await? {
                return Ok(Some((contact, "approved")));
            }
        }
    }
    // The platforms' own cross-links: an account this author's profile names,
    // or a profile elsewhere that names this account.
    for link in c.author.links.iter().filter(|l| !l.starts_with("http")) {
        let Some((platform, handle)) = link.split_once(':') else { continue };
        for profile in store.find_profiles(platform, handle).await? {
            if let Some(contact) = profile.contact_id {
                return Ok(Some((contact, "cross-link")));
            }
        }
    }
    for account in [&c.author.id].into_iter().chain(c.author.handle.as_ref()) {
        let account = format!("{}:{}", c.platform, account.trim_start_matches('@'));
        for profile in store.profiles_linking_to(&account).await? {
            if let Some(contact) = profile.contact_id.filter(|_| profile.identity != identity) {
                return Ok(Some((contact, "cross-link")));
            }
        }
    }
    if let Some(email) = c.author.email.as_deref().filter(|e| !e.trim().is_empty()) {
        for profile in store.profiles_by_email(email).await? {
            if let Some(contact) = profile.contact_id.filter(|_| profile.identity != identity) {
                return Ok(Some((contact, "email")));
            }
        }
    }
    Ok(None)
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
    let mut newly_linked: Vec<String> = Vec::new();
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
            None => match linked_locally(store, c).await? {
                Some((contact, via)) => {
                    store.link_identity(&identity, &contact, via).await?;
                    newly_linked.push(identity.clone());
                    by_identity.insert(identity, Resolution::Contact(contact));
                }
                None => unresolved.push(c),
            },
        }
    }

    let unresolved_keys: Vec<String> = unresolved.iter().map(|c| c.identity_key()).collect();
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

    // Weak evidence about the newly linked goes to the review queue.
    newly_linked
        .extend(unresolved_keys.into_iter().filter(|key| matches!(by_identity.get(key), Some(Resolution::Contact(_)))));
    for identity in &newly_linked {
        let queued = store.suggest_reviews(identity).await?;
        if queued > 0 {
            tracing::info!(identity = %identity, queued, "possible same person queued for review");
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

/// One side of `tributary identity link`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A platform identity the store has seen (`platform:user id`).
    Identity(String),
    /// A handle not seen yet: linked under [`handle_alias`].
    Handle { platform: String, handle: String },
    /// A CRM contact, written `CRMKIND:ID` (e.g. `hubspot:12345`) or `contact:ID`.
    Contact(String),
}

impl Target {
    /// The key this side is linked under.
    fn key(&self) -> String {
        match self {
            Target::Identity(identity) => identity.clone(),
            Target::Handle { platform, handle } => handle_alias(platform, handle),
            Target::Contact(id) => format!("contact:{id}"),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Identity(identity) => write!(f, "{identity}"),
            Target::Handle { platform, handle } => write!(f, "{platform}:{handle} (not seen yet)"),
            Target::Contact(id) => write!(f, "contact {id}"),
        }
    }
}

/// Reads `platform:user-id-or-handle` or `CRMKIND:contact-id`.
pub async fn parse_target(store: &dyn StateStore, crm_kind: &str, text: &str) -> Result<Target, IdentityError> {
    let Some((prefix, rest)) = text.split_once(':').filter(|(p, r)| !p.is_empty() && !r.trim().is_empty()) else {
        return Err(IdentityError::Refused(format!(
            "`{text}` is neither `platform:handle` (e.g. reddit:u/alice) nor `{crm_kind}:CONTACT_ID`"
        )));
    };
    if prefix == crm_kind || prefix == "contact" {
        return Ok(Target::Contact(rest.trim().to_owned()));
    }
    let found = store.find_profiles(prefix, rest).await?;
    match found.as_slice() {
        [] => Ok(Target::Handle { platform: prefix.to_owned(), handle: rest.trim().to_owned() }),
        [one] => Ok(Target::Identity(one.identity.clone())),
        many => Err(IdentityError::Refused(format!(
            "`{text}` names {} identities ({}); use the user id",
            many.len(),
            many.iter().map(|p| p.identity.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

async fn contact_of(store: &dyn StateStore, target: &Target) -> Result<Option<String>, StateError> {
    match target {
        Target::Contact(id) => Ok(Some(id.clone())),
        other => store.identity(&other.key()).await,
    }
}

/// Merges `merged` into `survivor`: in the CRM first (the activities move
/// there, none is copied), then in the state store.
pub async fn merge_contacts(
    store: &dyn StateStore,
    crm: &dyn Crm,
    survivor: &str,
    merged: &str,
) -> Result<(), IdentityError> {
    crm.merge_contacts(survivor, merged).await?;
    store.merge_contacts(survivor, merged).await?;
    tracing::info!(survivor, merged, "contacts merged");
    Ok(())
}

/// Records that `a` and `b` are one person; returns what was done, in words.
pub async fn link(store: &dyn StateStore, crm: &dyn Crm, a: &Target, b: &Target) -> Result<String, IdentityError> {
    if let (Target::Contact(x), Target::Contact(y)) = (a, b)
        && x == y
    {
        return Ok(format!("{a} is {b} already"));
    }
    let (contact_a, contact_b) = (contact_of(store, a).await?, contact_of(store, b).await?);
    let unlinked = if contact_a.is_none() { a } else { b };
    match (contact_a, contact_b) {
        (Some(x), Some(y)) if x == y => Ok(format!("{a} and {b} are one contact ({x}) already")),
        (Some(x), Some(y)) => {
            // An explicit contact survives; else the first side's.
            let (survivor, merged) = if matches!(b, Target::Contact(_)) { (y, x) } else { (x, y) };
            merge_contacts(store, crm, &survivor, &merged).await?;
            Ok(format!("merged contact {merged} into {survivor}: {a} and {b} are one person"))
        }
        (Some(contact), None) | (None, Some(contact)) => {
            store.link_identity(&unlinked.key(), &contact, "admin").await?;
            store.approve_pair(&a.key(), &b.key(), "linked by an administrator").await?;
            Ok(format!("linked {unlinked} to contact {contact}"))
        }
        (None, None) => {
            store.approve_pair(&a.key(), &b.key(), "linked by an administrator").await?;
            Ok(format!("{a} and {b} will share one contact once either is resolved"))
        }
    }
}

/// Approves a queued pair: their contacts become one.
pub async fn approve(store: &dyn StateStore, crm: &dyn Crm, id: i64) -> Result<String, IdentityError> {
    let review = store
        .review(id)
        .await?
        .ok_or_else(|| IdentityError::Refused(format!("no review {id}; see `tributary identity pending`")))?;
    let done =
        link(store, crm, &Target::Identity(review.a.identity.clone()), &Target::Identity(review.b.identity.clone()))
            .await?;
    store.decide_review(id, true).await?;
    Ok(done)
}

/// Rejects a queued pair: it is never queued again.
pub async fn reject(store: &dyn StateStore, id: i64) -> Result<(), IdentityError> {
    match store.decide_review(id, false).await? {
        Some(_) => Ok(()),
        None => Err(IdentityError::Refused(format!("no review {id}; see `tributary identity pending`"))),
    }
}

/// Reads the CRM's per-platform handle fields back (during `crm setup` and
/// on a schedule): an identity never linked is linked to the contact that
/// carries its handle; one linked elsewhere goes to the review queue, since
/// the CRM's data and an earlier resolution disagree. Only identities seen in
/// the last 90 days are checked (one CRM search each). Returns (linked, queued).
pub async fn recheck_handles(store: &dyn StateStore, crm: &dyn Crm) -> Result<(u64, u64), IdentityError> {
    let (mut linked, mut queued) = (0, 0);
    // People active in the last 90 days: one CRM search each, not the whole history.
    for profile in store.profiles_seen_since(chrono::Utc::now() - chrono::Duration::days(90)).await? {
        let Some(handle) = profile.handle.clone() else { continue };
        let lookup = ContactLookup::Handle { platform: profile.platform.clone(), handle: handle.clone() };
        let Some(contact) = crm.find_contact(&lookup).await? else { continue };
        match profile.contact_id {
            None => {
                store.link_identity(&profile.identity, &contact, "crm-handle").await?;
                linked += 1;
            }
            Some(current) if current != contact => {
                // The CRM's own field against an earlier resolution: a person decides.
                if let Some(partner) = store.profiles_of_contact(&contact).await?.first() {
                    let evidence =
                        format!("the CRM's {} handle field of contact {contact} says \"{handle}\"", profile.platform);
                    if store.queue_review(&partner.identity, &profile.identity, &evidence).await? {
                        queued += 1;
                    }
                }
            }
            Some(_) => {}
        }
    }
    Ok((linked, queued))
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
            links: Vec::new(),
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

    #[tokio::test]
    async fn cross_links_link_and_a_shared_website_waits_for_review() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let crm = FileCrm::new(FileCrmConfig { path: dir.path().join("crm.json") }).unwrap();
        let mut github = by("github", "1", "alice", None);
        github.author.links = vec!["https://alice.dev".into(), "x:alice_x".into()];
        let x = by("x", "99", "alice_x", None);
        let mut forum = by("discourse", "5", "al", None);
        forum.author.display_name = Some("A.".into());
        // Discourse stores websites as typed, often with `http://`.
        forum.author.links = vec!["http://www.alice.dev/".into()];
        let mut resolved = Vec::new();
        // One at a time, as they would arrive.
        for c in [&github, &x, &forum] {
            let mut stored = c.clone();
            stored.external_id = format!("{}-{}", c.platform, c.author.id);
            store.commit_page("s", vec![stored], vec![], None).await.unwrap();
            let got = resolve(&store, &crm, UnknownAuthors::Create, &[c]).await.unwrap();
            resolved.push(got[0].clone());
        }
        let Resolution::Contact(alice) = &resolved[0] else { panic!("{resolved:?}") };
        assert_eq!(resolved[1], Resolution::Contact(alice.clone()), "the X account her GitHub profile names is hers");
        assert_ne!(resolved[2], Resolution::Contact(alice.clone()), "a shared website alone links nobody");
        let pending = store.reviews(Some("pending")).await.unwrap();
        assert_eq!(pending.len(), 1, "{pending:#?}");
        assert_eq!(pending[0].evidence, "same website http://www.alice.dev/");
        let sides = [pending[0].a.identity.as_str(), pending[0].b.identity.as_str()];
        assert!(sides.contains(&"discourse:5") && sides.contains(&"github:1"), "{sides:?}");

        // Approving merges the two contacts; the queue is empty.
        approve(&store, &crm, pending[0].id).await.unwrap();
        assert!(store.reviews(Some("pending")).await.unwrap().is_empty());
        assert_eq!(store.identity("discourse:5").await.unwrap(), store.identity("github:1").await.unwrap());
    }

    #[tokio::test]
    async fn the_crms_handle_fields_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let crm = FileCrm::new(FileCrmConfig { path: dir.path().join("crm.json") }).unwrap();
        let recent = |mut c: Contribution| {
            c.created_at = chrono::Utc::now() - chrono::Duration::days(1);
            c.external_id = c.identity_key();
            c
        };
        let (bo, cy) = (recent(by("forum", "f2", "bo", None)), recent(by("forum", "f3", "cy", None)));
        store.commit_page("s", vec![bo.clone(), cy.clone()], vec![], None).await.unwrap();
        // cy was resolved long ago to a contact of its own.
        store.link_identity("forum:f3", "77", "created").await.unwrap();
        // Later someone in sales typed both handles on contacts of their own.
        let typed = |identity: &str, handle: &str| ContactUpsert {
            identity: identity.into(),
            email: None,
            platform: "forum".into(),
            handle: Some(handle.into()),
            display_name: None,
            profile_url: None,
        };
        let ids = crm.upsert_contacts(&[typed("crm:1", "bo"), typed("crm:2", "cy")]).await.unwrap();
        let [RecordOutcome::Done(bo_contact), RecordOutcome::Done(cy_contact)] = ids.as_slice() else {
            panic!("{ids:?}")
        };
        store.link_identity("other:cy", cy_contact, "email").await.unwrap();
        store.commit_page("s", vec![recent(by("other", "cy", "cy-elsewhere", None))], vec![], None).await.unwrap();

        assert_eq!(recheck_handles(&store, &crm).await.unwrap(), (1, 1));
        assert_eq!(
            store.identity("forum:f2").await.unwrap().as_deref(),
            Some(bo_contact.as_str()),
            "never linked: linked"
        );
        assert_eq!(store.identity("forum:f3").await.unwrap().as_deref(), Some("77"), "linked elsewhere: not moved");
        let pending = store.reviews(Some("pending")).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert!(pending[0].evidence.contains("handle field"), "{}", pending[0].evidence);
        // Read back again: nothing new.
        assert_eq!(recheck_handles(&store, &crm).await.unwrap(), (0, 0));
    }
}
