//! A local CRM kept in one JSON file: contacts, activities and rollups,
//! applied with the same idempotent keys as a real CRM. It serves the quick
//! start and debugging. Every write replaces the file atomically (write a
//! temporary file, fsync, rename), so a crash never leaves half a file.
//!
//! Contacts can be merged (activities move, nothing is copied), activities
//! deleted for good, and free properties (`lifecyclestage`, `company`, ...)
//! that an administrator or a test sets in the file are read back for alert
//! rules.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tributary_sdk::{ActivityUpsert, ContactLookup, ContactUpsert, Crm, CrmError, RecordOutcome, Rollup, SetupReport};

/// Settings of the file CRM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCrmConfig {
    /// The JSON file holding the CRM; created with its folder when absent.
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read the file CRM `{path}`: {message}")]
    Read { path: PathBuf, message: String },
}

/// One contact of the file CRM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileContact {
    pub id: String,
    pub email: Option<String>,
    /// `platform:author id` of the author it was created for, when it has no e-mail.
    pub identity: Option<String>,
    pub name: Option<String>,
    /// Platform -> handle.
    pub handles: BTreeMap<String, String>,
    /// Platform -> the person's account id there.
    #[serde(default)]
    pub user_ids: BTreeMap<String, String>,
    /// Platform -> address of the person's profile there.
    #[serde(default)]
    pub profiles: BTreeMap<String, String>,
    /// The figures last written by `update_rollups`, whole.
    pub rollup: Option<Rollup>,
    /// Free properties an administrator or a test sets (`lifecyclestage`,
    /// `company`, ...), read by `contact_properties`; Tributary never writes them.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Ids of the contacts merged into this one (and of those merged into them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
}

/// One activity (a contribution) of the file CRM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileActivity {
    pub id: String,
    pub key: String,
    pub contact_id: String,
    pub platform: String,
    pub kind: String,
    pub url: Option<String>,
    pub title: Option<String>,
    pub body: String,
    pub created_at: DateTime<Utc>,
    pub language: Option<String>,
    pub sentiment: Option<f64>,
    pub intent: Option<String>,
    pub edited: bool,
    pub deleted: bool,
    /// Archived after a deletion (`on_delete = "archive"`): out of the timeline.
    #[serde(default)]
    pub archived: bool,
    /// How many times the activity was written after its creation.
    pub revisions: u64,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileCrmData {
    pub next_id: u64,
    /// Contact id -> contact.
    pub contacts: BTreeMap<String, FileContact>,
    /// Activity key -> activity.
    pub activities: BTreeMap<String, FileActivity>,
}

impl FileCrmData {
    /// Reads a file CRM (for tests and tools).
    pub fn read(path: &Path) -> Result<FileCrmData, BuildError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| BuildError::Read { path: path.to_owned(), message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileCrmData::default()),
            Err(e) => Err(BuildError::Read { path: path.to_owned(), message: e.to_string() }),
        }
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    /// The contact `id` names: itself, or the contact it was merged into.
    fn resolve(&self, id: &str) -> Option<&FileContact> {
        self.contacts
            .get(id)
            .or_else(|| self.contacts.values().find(|contact| contact.merged_from.iter().any(|m| m == id)))
    }

    /// Moves everything of `merged` into `survivor`; see [`Crm::merge_contacts`] of [`FileCrm`].
    fn merge(&mut self, survivor: &str, merged: &str) -> Result<bool, CrmError> {
        if !self.contacts.contains_key(survivor) {
            let into = self.resolve(survivor).map(|contact| contact.id.clone());
            return Err(CrmError::Unsupported(match into {
                Some(into) => format!(
                    "cannot merge contact {merged} into {survivor}: {survivor} was itself merged into {into}; \
                     merge into {into} instead"
                ),
                None => {
                    format!("cannot merge contact {merged} into {survivor}: the file CRM has no contact {survivor}")
                }
            }));
        }
        if survivor == merged {
            return Ok(false);
        }
        let Some(gone) = self.contacts.remove(merged) else {
            let done = self.contacts.get(survivor).is_some_and(|s| s.merged_from.iter().any(|m| m == merged));
            return if done {
                Ok(false)
            } else {
                Err(CrmError::Unsupported(format!(
                    "cannot merge contact {merged} into {survivor}: the file CRM has no contact {merged}"
                )))
            };
        };
        for activity in self.activities.values_mut().filter(|activity| activity.contact_id == merged) {
            activity.contact_id = survivor.to_owned();
        }
        let Some(kept) = self.contacts.get_mut(survivor) else {
            return Err(CrmError::Io(format!("contact {survivor} vanished during a merge")));
        };
        let FileContact { id, email, identity, name, handles, user_ids, profiles, rollup: _, properties, merged_from } =
            gone;
        kept.email = kept.email.take().or(email);
        kept.identity = kept.identity.take().or(identity);
        kept.name = kept.name.take().or(name);
        for (into, from) in
            [(&mut kept.handles, handles), (&mut kept.user_ids, user_ids), (&mut kept.profiles, profiles)]
        {
            for (platform, value) in from {
                into.entry(platform).or_insert(value);
            }
        }
        for (name, value) in properties {
            kept.properties.entry(name).or_insert(value);
        }
        for merged_id in merged_from.into_iter().chain([id]) {
            if !kept.merged_from.contains(&merged_id) {
                kept.merged_from.push(merged_id);
            }
        }
        Ok(true)
    }

    fn find(&self, lookup: &ContactLookup) -> Option<String> {
        self.contacts
            .values()
            .find(|c| match lookup {
                ContactLookup::Email(email) => c.email.as_deref().is_some_and(|e| e.eq_ignore_ascii_case(email)),
                ContactLookup::Handle { platform, handle } => c.handles.get(platform) == Some(handle),
            })
            .map(|c| c.id.clone())
    }
}

pub struct FileCrm {
    path: PathBuf,
    data: Arc<Mutex<FileCrmData>>,
}

impl FileCrm {
    pub fn new(config: FileCrmConfig) -> Result<FileCrm, BuildError> {
        let data = FileCrmData::read(&config.path)?;
        Ok(FileCrm { path: config.path, data: Arc::new(Mutex::new(data)) })
    }

    async fn persist(&self, data: &FileCrmData) -> Result<(), CrmError> {
        let path = self.path.clone();
        let bytes = serde_json::to_vec_pretty(data).map_err(|e| CrmError::Io(e.to_string()))?;
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| CrmError::Io(e.to_string()))?
            .map_err(|e| CrmError::Io(e.to_string()))
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[async_trait]
impl Crm for FileCrm {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn check(&self) -> Result<(), CrmError> {
        let data = self.data.lock().await;
        self.persist(&data).await
    }

    async fn setup(&self, _platforms: &[String]) -> Result<SetupReport, CrmError> {
        Ok(SetupReport { created: vec![], existing: vec!["(the file CRM needs no custom fields)".into()] })
    }

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError> {
        Ok(self.data.lock().await.find(lookup))
    }

    async fn upsert_contacts(&self, contacts: &[ContactUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let mut data = self.data.lock().await;
        let mut outcomes = Vec::with_capacity(contacts.len());
        for input in contacts {
            let existing = match &input.email {
                Some(email) => data.find(&ContactLookup::Email(email.clone())),
                None => {
                    data.contacts.values().find(|c| c.identity.as_ref() == Some(&input.identity)).map(|c| c.id.clone())
                }
            };
            let id = match existing {
                Some(id) => id,
                None => {
                    let id = data.new_id();
                    let contact = FileContact {
                        id: id.clone(),
                        email: input.email.clone(),
                        identity: input.email.is_none().then(|| input.identity.clone()),
                        name: input.display_name.clone(),
                        ..FileContact::default()
                    };
                    data.contacts.insert(id.clone(), contact);
                    id
                }
            };
            if let Some(contact) = data.contacts.get_mut(&id) {
                if let Some(handle) = &input.handle {
                    contact.handles.insert(input.platform.clone(), handle.clone());
                }
                if let Some(user_id) = input.identity.strip_prefix(&format!("{}:", input.platform)) {
                    contact.user_ids.insert(input.platform.clone(), user_id.to_owned());
                }
                if let Some(url) = &input.profile_url {
                    contact.profiles.insert(input.platform.clone(), url.clone());
                }
            }
            outcomes.push(RecordOutcome::Done(id));
        }
        self.persist(&data).await?;
        Ok(outcomes)
    }

    async fn upsert_activities(&self, activities: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let mut data = self.data.lock().await;
        let mut outcomes = Vec::with_capacity(activities.len());
        for input in activities {
            if !data.contacts.contains_key(&input.contact_id) {
                outcomes.push(RecordOutcome::Rejected(format!("no contact with id {}", input.contact_id)));
                continue;
            }
            let c = &input.contribution;
            let (id, revisions, archived) = match data.activities.get(&input.key) {
                Some(existing) => (existing.id.clone(), existing.revisions + 1, existing.archived),
                None => (data.new_id(), 0, false),
            };
            let activity = FileActivity {
                id: id.clone(),
                key: input.key.clone(),
                contact_id: input.contact_id.clone(),
                platform: c.platform.clone(),
                kind: c.kind.as_str().to_owned(),
                url: c.url.clone(),
                title: c.title.clone(),
                body: c.body.clone(),
                created_at: c.created_at,
                language: c.language.clone(),
                sentiment: c.signals.as_ref().map(|s| s.sentiment),
                intent: c.signals.as_ref().map(|s| s.intent.as_str().to_owned()),
                edited: c.edited,
                deleted: c.deleted,
                archived,
                revisions,
            };
            data.activities.insert(input.key.clone(), activity);
            outcomes.push(RecordOutcome::Done(id));
        }
        self.persist(&data).await?;
        Ok(outcomes)
    }

    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut data = self.data.lock().await;
        for activity in data.activities.values_mut().filter(|a| activity_ids.contains(&a.id)) {
            activity.archived = true;
        }
        self.persist(&data).await?;
        Ok(vec![RecordOutcome::Done(()); activity_ids.len()])
    }

    async fn update_rollups(&self, rollups: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut data = self.data.lock().await;
        let outcomes = rollups
            .iter()
            .map(|rollup| match data.contacts.get_mut(&rollup.contact_id) {
                Some(contact) => {
                    contact.rollup = Some(rollup.clone());
                    RecordOutcome::Done(())
                }
                None => RecordOutcome::Rejected(format!("no contact with id {}", rollup.contact_id)),
            })
            .collect();
        self.persist(&data).await?;
        Ok(outcomes)
    }

    /// Removes the activities from the file; ids it does not hold are done.
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut data = self.data.lock().await;
        let before = data.activities.len();
        data.activities.retain(|_, activity| !activity_ids.contains(&activity.id));
        if data.activities.len() != before {
            self.persist(&data).await?;
        }
        Ok(vec![RecordOutcome::Done(()); activity_ids.len()])
    }

    /// Moves every activity of `merged` to `survivor` (same ids), adds the
    /// handles, account ids, profiles and properties the survivor lacks
    /// (its own values win; its e-mail, identity and name too, unless it has
    /// none), records `merged` in `merged_from` and removes it with its
    /// rollup. Merging one already merged into the survivor is done.
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let mut data = self.data.lock().await;
        let mut changed = data.clone();
        if changed.merge(survivor.trim(), merged.trim())? {
            self.persist(&changed).await?;
            *data = changed;
        }
        Ok(())
    }

    /// The contact's free `properties`, plus `email` and `name` when asked;
    /// a merged contact's id reads as the contact it went into.
    async fn contact_properties(
        &self,
        contact_id: &str,
        names: &[String],
    ) -> Result<BTreeMap<String, String>, CrmError> {
        let data = self.data.lock().await;
        let Some(contact) = data.resolve(contact_id.trim()) else {
            return Err(CrmError::Unsupported(format!("the file CRM has no contact {}", contact_id.trim())));
        };
        Ok(names
            .iter()
            .filter_map(|name| {
                let value = match name.as_str() {
                    "email" => contact.email.as_ref(),
                    "name" => contact.name.as_ref(),
                    other => contact.properties.get(other),
                };
                value.filter(|value| !value.is_empty()).map(|value| (name.clone(), value.clone()))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use tributary_sdk::{Author, Contribution};

    use super::*;

    fn contribution(id: &str, body: &str) -> Contribution {
        Contribution {
            platform: "forum".into(),
            source: "demo".into(),
            external_id: id.into(),
            author: Author { id: "u1".into(), ..Author::default() },
            body: body.into(),
            ..Contribution::sample()
        }
    }

    #[tokio::test]
    async fn upserts_are_idempotent_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/crm.json");
        let crm = FileCrm::new(FileCrmConfig { path: path.clone() }).unwrap();
        let maya = ContactUpsert {
            identity: "forum:u1".into(),
            email: Some("Maya@example.com".into()),
            platform: "forum".into(),
            handle: Some("mayac".into()),
            display_name: Some("Maya".into()),
            profile_url: None,
        };
        let support =
            ContactUpsert { platform: "support".into(), email: Some("maya@example.com".into()), ..maya.clone() };
        let ids = crm.upsert_contacts(&[maya.clone(), support]).await.unwrap();
        assert_eq!(ids[0], ids[1], "same e-mail, same contact");
        let RecordOutcome::Done(contact_id) = ids[0].clone() else { panic!("{ids:?}") };

        let activity = ActivityUpsert {
            key: "k1".into(),
            contact_id: contact_id.clone(),
            contribution: contribution("1", "hi"),
            existing_id: None,
        };
        crm.upsert_activities(std::slice::from_ref(&activity)).await.unwrap();
        let edited = ActivityUpsert { contribution: contribution("1", "hi, edited"), ..activity };
        crm.upsert_activities(&[edited]).await.unwrap();

        let data = FileCrmData::read(&path).unwrap();
        assert_eq!(data.contacts.len(), 1);
        assert_eq!(data.contacts[&contact_id].handles.len(), 2);
        assert_eq!(data.contacts[&contact_id].user_ids["forum"], "u1");
        assert_eq!(data.activities.len(), 1);
        assert_eq!(data.activities["k1"].body, "hi, edited");
        assert_eq!(data.activities["k1"].revisions, 1);

        let reopened = FileCrm::new(FileCrmConfig { path }).unwrap();
        let again = reopened.upsert_contacts(&[maya]).await.unwrap();
        assert_eq!(again[0], RecordOutcome::Done(contact_id.clone()));
        let found = reopened
            .find_contact(&ContactLookup::Handle { platform: "support".into(), handle: "mayac".into() })
            .await
            .unwrap();
        assert_eq!(found, Some(contact_id));
    }

    fn crm(dir: &tempfile::TempDir) -> (FileCrm, PathBuf) {
        let path = dir.path().join("crm.json");
        (FileCrm::new(FileCrmConfig { path: path.clone() }).unwrap(), path)
    }

    fn person(platform: &str, user: &str, email: Option<&str>, handle: &str) -> ContactUpsert {
        ContactUpsert {
            identity: format!("{platform}:{user}"),
            email: email.map(str::to_owned),
            platform: platform.into(),
            handle: Some(handle.into()),
            display_name: Some(handle.into()),
            profile_url: Some(format!("https://{platform}.example/{handle}")),
        }
    }

    async fn contact_id(crm: &FileCrm, contact: ContactUpsert) -> String {
        match crm.upsert_contacts(&[contact]).await.unwrap().remove(0) {
            RecordOutcome::Done(id) => id,
            other => panic!("{other:?}"),
        }
    }

    async fn activity_ids(crm: &FileCrm, contact_id: &str, keys: &[&str]) -> Vec<String> {
        let activities: Vec<ActivityUpsert> = keys
            .iter()
            .map(|key| ActivityUpsert {
                key: (*key).into(),
                contact_id: contact_id.into(),
                contribution: contribution(key, "text"),
                existing_id: None,
            })
            .collect();
        crm.upsert_activities(&activities)
            .await
            .unwrap()
            .into_iter()
            .map(|outcome| match outcome {
                RecordOutcome::Done(id) => id,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn rollups_are_stored_whole_with_every_figure() {
        let dir = tempfile::tempdir().unwrap();
        let (crm, path) = crm(&dir);
        let id = contact_id(&crm, person("forum", "u1", Some("maya@example.com"), "mayac")).await;
        let rollup = Rollup {
            contact_id: id.clone(),
            contribution_count: 4,
            last_url: Some("https://forum.example/t/1".into()),
            last_excerpt: Some("It crashes <b>again</b>".into()),
            count_90d: 3,
            sentiment_avg_90d: Some(-0.5),
            needs_attention: true,
            attention_reason: Some("an unresolved complaint".into()),
            per_platform: vec![tributary_sdk::PlatformRollup {
                platform: "forum".into(),
                handle: Some("mayac".into()),
                profile_url: None,
                first_seen: DateTime::from_timestamp(1_600_000_000, 0).unwrap_or_default(),
                last_seen: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
                contributions: 4,
            }],
            ..Rollup::default()
        };
        crm.update_rollups(std::slice::from_ref(&rollup)).await.unwrap();
        let data = FileCrmData::read(&path).unwrap();
        assert_eq!(data.contacts[&id].rollup.as_ref(), Some(&rollup));
        // A file written before these fields existed still reads.
        let old = r#"{"next_id": 1, "contacts": {"1": {"id": "1", "email": null, "identity": "forum:u1", "name": null,
            "handles": {}, "rollup": {"contact_id": "1", "last_contribution_at": "2023-11-14T22:13:20Z",
            "last_platform": "forum", "contribution_count": 1, "platforms": ["forum"], "sentiment_avg": 0.0,
            "questions": 0, "complaints": 0, "ideas": 0, "praise": 0}}}, "activities": {}}"#;
        std::fs::write(&path, old).unwrap();
        let data = FileCrmData::read(&path).unwrap();
        assert!(data.contacts["1"].properties.is_empty() && data.contacts["1"].merged_from.is_empty());
        assert_eq!(data.contacts["1"].rollup.as_ref().map(|r| r.count_90d), Some(0));
    }

    #[tokio::test]
    async fn merging_moves_activities_and_merging_again_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let (crm, path) = crm(&dir);
        let maya = contact_id(&crm, person("forum", "u1", Some("maya@example.com"), "mayac")).await;
        let rusty = contact_id(&crm, person("social", "42", None, "rusty")).await;
        // Both know the person on the forum; the survivor's handle wins.
        crm.upsert_contacts(&[ContactUpsert { identity: "social:42".into(), ..person("forum", "u9", None, "other") }])
            .await
            .unwrap();
        let kept = activity_ids(&crm, &maya, &["k1"]).await;
        let moved = activity_ids(&crm, &rusty, &["k2", "k3"]).await;
        crm.update_rollups(&[Rollup { contact_id: rusty.clone(), ..Rollup::default() }]).await.unwrap();

        crm.merge_contacts(&maya, &rusty).await.unwrap();
        let data = FileCrmData::read(&path).unwrap();
        assert_eq!(data.contacts.keys().collect::<Vec<_>>(), [&maya], "the merged contact is gone with its rollup");
        let survivor = &data.contacts[&maya];
        assert_eq!(survivor.email.as_deref(), Some("maya@example.com"));
        assert_eq!(survivor.name.as_deref(), Some("mayac"));
        assert_eq!(survivor.handles["forum"], "mayac");
        assert_eq!(survivor.handles["social"], "rusty");
        assert_eq!(survivor.user_ids["social"], "42");
        assert_eq!(survivor.profiles["social"], "https://social.example/rusty");
        assert_eq!(survivor.identity.as_deref(), Some("social:42"), "the survivor had none: it takes the other's");
        assert_eq!(survivor.merged_from, std::slice::from_ref(&rusty));
        assert_eq!(data.activities.len(), 3, "moved, not copied");
        for (key, id) in [("k1", &kept[0]), ("k2", &moved[0]), ("k3", &moved[1])] {
            assert_eq!(&data.activities[key].id, id, "{key} kept its id");
            assert_eq!(data.activities[key].contact_id, maya, "{key}");
        }
        // Lookups never find the merged contact; the merged handle leads to the survivor.
        let by_handle = ContactLookup::Handle { platform: "social".into(), handle: "rusty".into() };
        assert_eq!(crm.find_contact(&by_handle).await.unwrap(), Some(maya.clone()));

        // A replay changes nothing.
        crm.merge_contacts(&maya, &rusty).await.unwrap();
        assert_eq!(FileCrmData::read(&path).unwrap(), data);
        // Unknown contacts are errors, and so is a survivor merged away.
        for (survivor, merged, expected) in [
            ("404", maya.as_str(), "no contact 404"),
            (maya.as_str(), "405", "no contact 405"),
            (rusty.as_str(), maya.as_str(), "merged into"),
        ] {
            let error = crm.merge_contacts(survivor, merged).await.unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
        assert_eq!(FileCrmData::read(&path).unwrap(), data);
    }

    #[tokio::test]
    async fn merges_chain_and_the_survivor_keeps_its_email() {
        let dir = tempfile::tempdir().unwrap();
        let (crm, path) = crm(&dir);
        let a = contact_id(&crm, person("forum", "1", None, "a")).await;
        let b = contact_id(&crm, person("forum", "2", Some("b@example.com"), "b")).await;
        let c = contact_id(&crm, person("chat", "3", Some("c@example.com"), "c")).await;
        crm.merge_contacts(&b, &a).await.unwrap();
        crm.merge_contacts(&c, &b).await.unwrap();
        let data = FileCrmData::read(&path).unwrap();
        let survivor = &data.contacts[&c];
        assert_eq!(data.contacts.len(), 1);
        assert_eq!(survivor.email.as_deref(), Some("c@example.com"));
        assert_eq!(survivor.merged_from, [a.clone(), b.clone()]);
        // Merging the first one again into the last survivor is done.
        crm.merge_contacts(&c, &a).await.unwrap();
        assert_eq!(crm.find_contact(&ContactLookup::Email("b@example.com".into())).await.unwrap(), None);
    }

    #[tokio::test]
    async fn deleted_activities_leave_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (crm, path) = crm(&dir);
        let id = contact_id(&crm, person("forum", "u1", Some("maya@example.com"), "mayac")).await;
        let ids = activity_ids(&crm, &id, &["k1", "k2"]).await;
        let outcomes = crm.delete_activities(&[ids[0].clone(), "999".into()]).await.unwrap();
        assert_eq!(outcomes, [RecordOutcome::Done(()), RecordOutcome::Done(())]);
        let data = FileCrmData::read(&path).unwrap();
        assert_eq!(data.activities.keys().collect::<Vec<_>>(), ["k2"]);
        // Again: still done, nothing else goes.
        crm.delete_activities(&ids[..1]).await.unwrap();
        assert_eq!(FileCrmData::read(&path).unwrap().activities.len(), 1);
    }

    #[tokio::test]
    async fn contact_properties_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (crm, path) = crm(&dir);
        let id = contact_id(&crm, person("forum", "u1", Some("maya@example.com"), "mayac")).await;
        // An administrator edits the file, then the CRM is opened again.
        let mut data = FileCrmData::read(&path).unwrap();
        let contact = data.contacts.get_mut(&id).unwrap();
        contact.properties.insert("lifecyclestage".into(), "customer".into());
        contact.properties.insert("company".into(), "Acme".into());
        contact.properties.insert("jobtitle".into(), String::new());
        std::fs::write(&path, serde_json::to_vec(&data).unwrap()).unwrap();
        let crm = FileCrm::new(FileCrmConfig { path }).unwrap();

        let names: Vec<String> =
            ["lifecyclestage", "company", "jobtitle", "email", "name", "phone"].map(String::from).into();
        let found = crm.contact_properties(&id, &names).await.unwrap();
        let expected: BTreeMap<String, String> =
            [("company", "Acme"), ("email", "maya@example.com"), ("lifecyclestage", "customer"), ("name", "mayac")]
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .into();
        assert_eq!(found, expected);
        let error = crm.contact_properties("404", &names).await.unwrap_err();
        assert!(error.to_string().contains("no contact 404"), "{error}");

        // After a merge, the merged id reads as the survivor, whose values win.
        let other = contact_id(&crm, person("social", "9", None, "other")).await;
        let mut data = crm.data.lock().await;
        if let Some(contact) = data.contacts.get_mut(&other) {
            contact.properties.insert("company".into(), "Other Inc".into());
            contact.properties.insert("phone".into(), "+1 555".into());
        }
        drop(data);
        crm.merge_contacts(&id, &other).await.unwrap();
        let found = crm.contact_properties(&other, &names).await.unwrap();
        assert_eq!(found["company"], "Acme");
        assert_eq!(found["phone"], "+1 555");
    }
}
