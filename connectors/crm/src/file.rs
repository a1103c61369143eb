//! A local CRM kept in one JSON file: contacts, activities and rollups,
//! applied with the same idempotent keys as a real CRM. It serves the quick
//! start and debugging. Every write replaces the file atomically (write a
//! temporary file, fsync, rename), so a crash never leaves half a file.

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
    pub rollup: Option<Rollup>,
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
}
