//! The BottleCRM sink end to end against a real BottleCRM (PyPI `django-crm`)
//! started here: the demo source synced twice through the real binary, then
//! every contact and comment read back through BottleCRM's API.
//!
//! Runs only with `TRIBUTARY_TEST_BOTTLECRM=1`; it needs Python 3.12
//! (`TRIBUTARY_BOTTLECRM_PYTHON`, else pyenv's 3.12.1, else `python3.12`),
//! PostgreSQL (libpq's `PGHOST`/`PGPORT`/`PGUSER`/`PGPASSWORD`, default
//! `postgres@127.0.0.1:5432`, allowed to create databases, `psql` on the
//! path) and Redis (`TRIBUTARY_BOTTLECRM_REDIS`, default
//! `redis://127.0.0.1:6379/15`, for the Celery tasks BottleCRM queues).
//!
//! Provisioning, all cached so a rerun takes seconds:
//! 1. a venv in `target/bottlecrm-venv` with `pip install django-crm packaging`
//!    (kombu's Redis transport imports `packaging`, which django-crm does not
//!    declare: without it every contact creation answers 500);
//! 2. a migrated template database `tributary_bottlecrm_tpl_<version>`
//!    (`django-admin migrate` takes about two minutes), copied into a fresh
//!    database per run with `CREATE DATABASE .. TEMPLATE ..`;
//! 3. `tests/bottlecrm/bootstrap.py` creates a user, an org, an admin profile
//!    and a personal access token;
//! 4. `uvicorn crm.asgi:application` on a free loopback port.
//!
//! The server is stopped and the database dropped when the test ends, also
//! when it fails (a guard's `Drop`).

mod common;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Setup, free_port, stderr};
use serde_json::Value;
use tributary_demo::{DemoConfig, DemoSource};

const TOTAL: u64 = 25;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

fn python() -> String {
    if let Ok(python) = std::env::var("TRIBUTARY_BOTTLECRM_PYTHON") {
        return python;
    }
    let pyenv = "/root/.pyenv/versions/3.12.1/bin/python3.12";
    if Path::new(pyenv).exists() { pyenv.to_owned() } else { "python3.12".to_owned() }
}

fn run_ok(command: &mut Command, what: &str) -> String {
    let output = command.output().unwrap_or_else(|error| panic!("{what}: cannot start: {error}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn pg_env(command: &mut Command) -> &mut Command {
    for (name, default) in [("PGHOST", "127.0.0.1"), ("PGPORT", "5432"), ("PGUSER", "postgres")] {
        if std::env::var_os(name).is_none() {
            command.env(name, default);
        }
    }
    command
}

fn psql(sql: &str) -> String {
    run_ok(pg_env(Command::new("psql").args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc", sql])), sql)
}

/// The venv with django-crm, created once.
fn venv() -> PathBuf {
    let venv = target_dir().join("bottlecrm-venv");
    let ready = venv.join(".tributary-ready");
    if !ready.exists() {
        run_ok(Command::new(python()).args(["-m", "venv"]).arg(&venv), "python -m venv");
        run_ok(
            Command::new(venv.join("bin/pip")).args(["install", "-q", "django-crm", "packaging"]),
            "pip install django-crm",
        );
        std::fs::write(&ready, "").expect("venv marker");
    }
    venv
}

/// The environment BottleCRM's settings (`crm/settings.py`) read.
fn django_env<'a>(command: &'a mut Command, database: &str) -> &'a mut Command {
    let redis = std::env::var("TRIBUTARY_BOTTLECRM_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/15".into());
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    command
        .env("DJANGO_SETTINGS_MODULE", "crm.settings")
        .env("ENV_TYPE", "dev")
        .env("DEBUG", "False")
        .env("SECRET_KEY", "tributary-test-secret-key-0123456789-abcdefghijklmnop")
        .env("ALLOWED_HOSTS", "127.0.0.1,localhost")
        .env("DBNAME", database)
        .env("DBHOST", var("PGHOST", "127.0.0.1"))
        .env("DBPORT", var("PGPORT", "5432"))
        .env("DBUSER", var("PGUSER", "postgres"))
        .env("DBPASSWORD", var("PGPASSWORD", ""))
        .env("CELERY_BROKER_URL", &redis)
        .env("CELERY_RESULT_BACKEND", &redis)
}

fn database_exists(name: &str) -> bool {
    psql(&format!("SELECT 1 FROM pg_database WHERE datname = '{name}'")).trim() == "1"
}

/// A migrated template database for the installed django-crm version.
fn template(venv: &Path) -> String {
    let version = run_ok(
        Command::new(venv.join("bin/python"))
            .args(["-c", "import importlib.metadata as m; print(m.version('django-crm'))"]),
        "django-crm version",
    );
    let version: String =
        version.trim().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect::<String>();
    let name = format!("tributary_bottlecrm_tpl_{version}");
    if database_exists(&name) {
        return name;
    }
    let building = format!("tributary_bottlecrm_build_{}", std::process::id());
    psql(&format!("DROP DATABASE IF EXISTS {building}"));
    psql(&format!("CREATE DATABASE {building}"));
    let started = Instant::now();
    let migrated = django_env(Command::new(venv.join("bin/django-admin")).args(["migrate", "--noinput"]), &building)
        .output()
        .expect("django-admin migrate");
    if !migrated.status.success() {
        psql(&format!("DROP DATABASE IF EXISTS {building}"));
        panic!("migrate failed: {}", String::from_utf8_lossy(&migrated.stderr));
    }
    eprintln!("bottlecrm: migrated the template in {:?}", started.elapsed());
    // Another run may have won the race: keep its template.
    let renamed = pg_env(Command::new("psql").args([
        "-d",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
        "-tAc",
        &format!("ALTER DATABASE {building} RENAME TO {name}"),
    ]))
    .output()
    .expect("psql");
    if !renamed.status.success() {
        psql(&format!("DROP DATABASE IF EXISTS {building}"));
    }
    name
}

/// The running server and its database; both go away on drop.
struct Server {
    child: Option<Child>,
    database: String,
    base: String,
    token: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let dropped = pg_env(Command::new("psql").args([
            "-d",
            "postgres",
            "-tAc",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database),
        ]))
        .output();
        if !dropped.is_ok_and(|o| o.status.success()) {
            eprintln!("bottlecrm: could not drop database {}", self.database);
        }
    }
}

impl Server {
    async fn start(log_dir: &Path) -> Server {
        let venv = venv();
        let template = template(&venv);
        let database = format!("tributary_bottlecrm_{}_{}", std::process::id(), free_port());
        psql(&format!("CREATE DATABASE {database} TEMPLATE {template}"));
        let log = log_dir.join("bottlecrm.log");
        let mut server = Server { child: None, database, base: String::new(), token: String::new(), log: log.clone() };
        let script = root().join("tests/bottlecrm/bootstrap.py");
        let out =
            run_ok(django_env(Command::new(venv.join("bin/python")).arg(&script), &server.database), "bootstrap.py");
        server.token = out.lines().last().unwrap_or_default().trim().to_owned();
        assert!(server.token.starts_with("bcrm_pat_"), "no token from bootstrap.py");
        let port = free_port();
        let log_file = std::fs::File::create(&log).expect("server log");
        let child = django_env(
            Command::new(venv.join("bin/uvicorn")).args([
                "crm.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ]),
            &server.database,
        )
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start uvicorn");
        server.child = Some(child);
        server.base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            if let Ok(response) = server.client().get(format!("{}/api/contacts/?limit=1", server.base)).send().await
                && response.status().is_success()
            {
                break;
            }
            if let Some(child) = server.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("uvicorn exited with {status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(started.elapsed() < Duration::from_secs(90), "BottleCRM did not answer within 90 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server
    }

    fn client(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.token)).expect("header");
        auth.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        reqwest::Client::builder().default_headers(headers).build().expect("client")
    }

    async fn get(&self, path: &str) -> Value {
        let response = self.client().get(format!("{}/api/{path}", self.base)).send().await.expect("GET");
        assert!(response.status().is_success(), "GET {path}: {}", response.status());
        response.json().await.expect("json")
    }

    /// Every contact, and every comment of each (contact id, comment text).
    async fn read_back(&self) -> (Vec<Value>, Vec<(String, String)>) {
        let mut contacts = Vec::new();
        loop {
            let page = self.get(&format!("contacts/?limit=100&offset={}", contacts.len())).await;
            let results = page["results"].as_array().cloned().unwrap_or_default();
            let total = page["count"].as_u64().unwrap_or(0) as usize;
            let empty = results.is_empty();
            contacts.extend(results);
            if empty || contacts.len() >= total {
                break;
            }
        }
        let mut comments = Vec::new();
        for contact in &contacts {
            let id = contact["id"].as_str().expect("contact id");
            let detail = self.get(&format!("contacts/{id}/")).await;
            for comment in detail["comments"].as_array().cloned().unwrap_or_default() {
                comments.push((id.to_owned(), comment["comment"].as_str().unwrap_or_default().to_owned()));
            }
        }
        (contacts, comments)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_lands_in_a_real_bottlecrm_exactly_once() {
    if std::env::var_os("TRIBUTARY_TEST_BOTTLECRM").is_none() {
        eprintln!(
            "skipped: set TRIBUTARY_TEST_BOTTLECRM=1 to run against a real BottleCRM (needs Python 3.12, PostgreSQL, Redis)"
        );
        return;
    }
    let setup = Setup::new();
    let started = Instant::now();
    let server = Server::start(setup.dir.path()).await;
    eprintln!("bottlecrm: server ready in {:?}", started.elapsed());
    let config = |state: &str| {
        format!(
            r#"
[daemon]
state = "sqlite://{{dir}}/{state}"
[crm]
type = "bottlecrm"
base_url = "{}"
api_key = {{ env = "BOTTLECRM_API_KEY" }}
unknown_authors = "create"
[sources.demo]
type = "demo"
schedule = "every 10m"
seed = 42
per_page = 10
total = {TOTAL}
drain = true
"#,
            server.base
        )
    };
    setup.write_config(&config("state.db"));
    let env = [("BOTTLECRM_API_KEY", server.token.as_str())];

    let first = Instant::now();
    let sync = setup.run(&["sync", "demo"], &env);
    let first = first.elapsed();
    let log = || std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(sync.status.success(), "{}\n--- bottlecrm ---\n{}", stderr(&sync), log());
    assert!(!stderr(&sync).contains(&server.token), "the token was shown");

    // What the demo source emits: one activity per contribution, one contact
    // per e-mail or (without one) per platform identity.
    let demo = DemoSource::new("demo", DemoConfig { seed: 42, per_page: 10, total: TOTAL, drain: true });
    let contributions: Vec<_> = (0..TOTAL).map(|index| demo.contribution(index)).collect();
    let keys: HashSet<String> = contributions.iter().map(|c| c.activity_key()).collect();
    let people: HashSet<String> = contributions
        .iter()
        .map(|c| c.author.email.as_deref().map_or_else(|| c.identity_key(), str::to_lowercase))
        .collect();

    let (contacts, comments) = server.read_back().await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, text) in &comments {
        let key = text
            .rsplit_once("[tributary-key:")
            .and_then(|(_, rest)| rest.strip_suffix(']'))
            .unwrap_or_else(|| panic!("a comment without a key marker: {text}"));
        *seen.entry(key.to_owned()).or_default() += 1;
    }
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), keys, "every contribution, and only those");
    assert!(seen.values().all(|n| *n == 1), "a contribution landed twice: {seen:?}");
    assert_eq!(contacts.len(), people.len(), "one contact per person: {contacts:#?}");
    let emails: Vec<_> = contacts.iter().filter_map(|c| c["email"].as_str()).map(str::to_lowercase).collect();
    assert_eq!(emails.len(), emails.iter().collect::<HashSet<_>>().len(), "a duplicate e-mail");
    let identities: Vec<_> =
        contacts.iter().filter_map(|c| c["custom_fields"]["tributary_identity"].as_str()).collect();
    assert_eq!(identities.len(), identities.iter().collect::<HashSet<_>>().len(), "a duplicate identity");
    for person in &people {
        let found = if person.contains('@') { emails.contains(person) } else { identities.contains(&person.as_str()) };
        assert!(found, "no contact for {person}");
    }

    // Rollups land in the contacts' custom fields: the counts add up.
    let counted: f64 =
        contacts.iter().filter_map(|c| c["custom_fields"]["tributary_contribution_count"].as_f64()).sum();
    assert_eq!(counted as u64, TOTAL, "rollup counts: {contacts:#?}");

    // A second sync writes nothing new.
    let second = Instant::now();
    let again = setup.run(&["sync", "demo"], &env);
    let second = second.elapsed();
    assert!(again.status.success(), "{}", stderr(&again));
    let (contacts_after, comments_after) = server.read_back().await;
    assert_eq!(contacts_after.len(), contacts.len(), "the second sync created contacts");
    assert_eq!(comments_after.len(), comments.len(), "the second sync created comments");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("0 new, 0 updated"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );

    // The ledger lost (a fresh state database): every contribution is
    // delivered again, and the sink finds each contact and comment instead
    // of creating another.
    setup.write_config(&config("state-fresh.db"));
    let third = Instant::now();
    let replay = setup.run(&["sync", "demo"], &env);
    let third = third.elapsed();
    assert!(replay.status.success(), "{}\n--- bottlecrm ---\n{}", stderr(&replay), log());
    let (contacts_replayed, comments_replayed) = server.read_back().await;
    assert_eq!(contacts_replayed.len(), contacts.len(), "the replay created contacts");
    assert_eq!(comments_replayed.len(), comments.len(), "the replay created comments");
    eprintln!(
        "bottlecrm: {} contacts, {} comments; first sync {first:?}, second sync {second:?}, replay without ledger {third:?}",
        contacts.len(),
        comments.len(),
    );
    eprintln!("bottlecrm: replay: {}", String::from_utf8_lossy(&replay.stdout).trim());
}
