//! Shared helpers of the black-box tests: run the real binary with a
//! config in a temporary folder, talk to its HTTP endpoints.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_tributary");

/// A port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A temporary folder with a config file in it.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Setup {
    pub fn new() -> Setup {
        Setup { dir: tempfile::tempdir().expect("tempdir"), port: free_port() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `config.toml`; `{dir}` and `{port}` in the text are filled in.
    pub fn write_config(&self, text: &str) -> PathBuf {
        let text =
            text.replace("{dir}", &self.dir.path().display().to_string()).replace("{port}", &self.port.to_string());
        let path = self.path("config.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command.arg("--config").arg(self.path("config.toml")).args(args).env_remove("TRIBUTARY_CONFIG");
        command
    }

    /// Runs a one-shot command to its end.
    pub fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = self.command(args);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().expect("run tributary")
    }

    /// Starts `tributary run`; logs go to `daemon.log` in the folder.
    pub fn start(&self, env: &[(&str, &str)]) -> Daemon {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path("daemon.log")).expect("log file");
        let mut command = self.command(&["run"]);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.stdout(Stdio::null()).stderr(log).spawn().expect("spawn tributary");
        Daemon { child, base: format!("http://127.0.0.1:{}", self.port) }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }
}

pub struct Daemon {
    pub child: Child,
    pub base: String,
}

impl Daemon {
    /// Waits until `/healthz` answers.
    pub async fn wait_healthy(&mut self, within: Duration) {
        let started = Instant::now();
        while started.elapsed() < within {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("tributary exited early with {status}");
            }
            if let Ok(response) = reqwest::get(format!("{}/healthz", self.base)).await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("tributary did not become healthy within {within:?}");
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.base)).await.expect("GET");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success());
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(mut self, within: Duration) -> ExitStatus {
        self.signal("TERM");
        wait_exit(&mut self.child, within)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            panic!("tributary did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `condition` until it holds or `within` passes.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, mut condition: F) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    condition()
}

pub fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// A config with a HubSpot CRM at `hubspot` and the given sources (TOML).
pub fn hubspot_config(hubspot: &str, extra_crm: &str, sources: &str) -> String {
    format!(
        r#"
[daemon]
state = "sqlite://{{dir}}/state.db"
listen = "127.0.0.1:{{port}}"
delivery_interval = "200ms"
max_attempts = 10

[crm]
type = "hubspot"
base_url = "{hubspot}"
token = {{ env = "TEST_HUBSPOT_TOKEN" }}
{extra_crm}

{sources}
"#
    )
}

/// Every request body the mock HubSpot received, as text.
pub fn hubspot_bodies(hubspot: &tributary_crm::hubspot::mock::MockHubSpot) -> String {
    hubspot.requests().iter().filter_map(|r| r.body.as_ref()).map(|b| b.to_string()).collect::<Vec<_>>().join("\n")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Serves `first_page` as Discourse's `/posts.json` (replacing whatever
/// was mounted); paging back with `before=` finds nothing older.
pub async fn serve_discourse(server: &wiremock::MockServer, first_page: wiremock::ResponseTemplate) {
    use wiremock::{
        Mock, ResponseTemplate,
        matchers::{method, path, query_param_is_missing},
    };
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/posts.json"))
        .and(query_param_is_missing("before"))
        .respond_with(first_page)
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/posts.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "latest_posts": [] })))
        .mount(server)
        .await;
}

/// A mock Discourse serving `first_page`.
pub async fn discourse(first_page: wiremock::ResponseTemplate) -> wiremock::MockServer {
    let server = wiremock::MockServer::start().await;
    serve_discourse(&server, first_page).await;
    server
}
