//! A small WebDriver client (the W3C protocol, JSON over HTTP) for the console's browser
//! tests: Debian's `chromedriver` driving `chromium` headless, on loopback only. It speaks
//! through the API crate's HTTP client; what the tests need is a handful of commands.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use portless_api::Endpoint;
use portless_api::blocking::Client;
use serde_json::{Value, json};

/// The element key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running `chromedriver` and one browser session.
pub struct Browser {
    driver: Child,
    client: Client,
    session: String,
    _profile: PathBuf,
}

/// An element of the page.
#[derive(Debug, Clone)]
pub struct Element(String);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Browser {
    /// Starts `chromedriver` (`CHROMEDRIVER`, else `/usr/bin/chromedriver`) and a headless
    /// Chromium (`CHROMIUM`, else `/usr/bin/chromium`) of `width` x `height`, with a fresh
    /// profile under `dir`.
    pub fn start(dir: &Path, width: u32, height: u32) -> Self {
        let driver_bin =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            Path::new(&driver_bin).exists() && Path::new(&chromium).exists(),
            "the browser tests need {chromium} and {driver_bin} (apt-get install chromium chromium-driver)"
        );
        let port = free_port();
        let log = std::fs::File::create(dir.join(format!("chromedriver-{port}.log"))).expect("log");
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("chromedriver");
        let client = Client::at(Endpoint::Tcp(format!("127.0.0.1:{port}"))).expect("client");
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.raw("GET", "/status", &[], Vec::new()).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = dir.join(format!("profile-{port}"));
        let _ = std::fs::remove_dir_all(&profile);
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-quic".to_owned(),
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={width},{height}"),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let mut b = Self {
            driver,
            client,
            session: String::new(),
            _profile: profile,
        };
        let v = b.command("POST", "/session", &caps);
        b.session = v["sessionId"].as_str().expect("a session").to_owned();
        b
    }

    fn command(&self, method: &str, path: &str, body: &Value) -> Value {
        let r = self
            .client
            .raw(method, path, &[], body.to_string().into_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert!(
            r.status == 200,
            "{method} {path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        v["value"].clone()
    }

    fn session_command(&self, method: &str, path: &str, body: &Value) -> Value {
        self.command(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Opens `url`.
    pub fn go(&self, url: &str) {
        self.session_command("POST", "/url", &json!({ "url": url }));
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        self.session_command("GET", "/url", &json!({}))
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn run(&self, script: &str, args: &[Value]) -> Value {
        self.session_command(
            "POST",
            "/execute/sync",
            &json!({ "script": script, "args": args }),
        )
    }

    /// Runs asynchronous `script` (a function body whose last argument is the callback to
    /// call with the result), waiting up to `within` for it.
    pub fn run_async(&self, script: &str, args: &[Value], within: Duration) -> Value {
        let ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
        self.session_command("POST", "/timeouts", &json!({ "script": ms }));
        self.session_command(
            "POST",
            "/execute/async",
            &json!({ "script": script, "args": args }),
        )
    }

    /// Sends a DevTools protocol command (`Network.clearBrowserCache`) through chromedriver.
    pub fn cdp(&self, cmd: &str, params: &Value) -> Value {
        self.session_command(
            "POST",
            "/goog/cdp/execute",
            &json!({ "cmd": cmd, "params": params }),
        )
    }

    /// The elements matching CSS `selector` now.
    pub fn all(&self, selector: &str) -> Vec<Element> {
        let v = self.session_command(
            "POST",
            "/elements",
            &json!({"using": "css selector", "value": selector}),
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits up to `within` for an element matching `selector`.
    pub fn find(&self, selector: &str, within: Duration) -> Element {
        self.wait(within, &format!("an element {selector}"), || {
            self.all(selector).into_iter().next()
        })
    }

    /// Polls `f` every 50 ms until it gives a value, for up to `within`.
    pub fn wait<T>(&self, within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what}; page {}:\n{}",
                self.url(),
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The visible text of the first element matching `selector` (empty if none).
    pub fn text(&self, selector: &str) -> String {
        self.run(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            &[json!(selector)],
        )
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Clicks `e`.
    pub fn click(&self, e: &Element) {
        self.session_command("POST", &format!("/element/{}/click", e.0), &json!({}));
    }

    /// Types `text` into `e`.
    pub fn type_into(&self, e: &Element, text: &str) {
        self.session_command(
            "POST",
            &format!("/element/{}/value", e.0),
            &json!({ "text": text }),
        );
    }

    /// Clears `e`.
    pub fn clear(&self, e: &Element) {
        self.session_command("POST", &format!("/element/{}/clear", e.0), &json!({}));
    }

    /// Chooses `value` in the `<select>` `e`, as a person would (a `change` event follows).
    pub fn choose(&self, e: &Element, value: &str) {
        self.run(
            "arguments[0].value = arguments[1];\
             arguments[0].dispatchEvent(new Event('change', { bubbles: true }));",
            &[json!({ ELEMENT: e.0 }), json!(value)],
        );
    }

    /// Sets the file of an `<input type=file>`.
    pub fn choose_file(&self, e: &Element, path: &Path) {
        self.type_into(e, &path.display().to_string());
    }

    /// Saves a PNG of the viewport at `path`.
    pub fn screenshot(&self, path: &Path) {
        let v = self.session_command("GET", "/screenshot", &json!({}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("dir");
        }
        std::fs::write(path, png).expect("screenshot");
    }

    /// Saves a PNG of the whole page (resizing the window to the page's height first).
    pub fn screenshot_page(&self, path: &Path, width: u32) {
        let height = self
            .run("return document.documentElement.scrollHeight;", &[])
            .as_u64()
            .unwrap_or(800)
            .clamp(400, 4000);
        self.session_command(
            "POST",
            "/window/rect",
            &json!({"width": width, "height": height}),
        );
        self.screenshot(path);
    }

    /// Sets the window size.
    pub fn resize(&self, width: u32, height: u32) {
        self.session_command(
            "POST",
            "/window/rect",
            &json!({"width": width, "height": height}),
        );
    }

    /// The browser's console messages of level SEVERE since the last call.
    pub fn severe_logs(&self) -> Vec<String> {
        let v = self.session_command("POST", "/se/log", &json!({"type": "browser"}));
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e["level"] == "SEVERE")
                    .filter_map(|e| e["message"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The value of attribute or property `name` of `e`.
    pub fn property(&self, e: &Element, name: &str) -> Value {
        self.session_command(
            "GET",
            &format!("/element/{}/property/{name}", e.0),
            &json!({}),
        )
    }
}

/// The console's steps that the browser tests and the console's bench share.
impl Browser {
    /// Opens a one-time login link and confirms it; the principal the page named.
    pub fn log_in_with(&self, url: &str) -> String {
        self.go(url);
        let confirm = self.find("[data-test=login-confirm]", Duration::from_secs(10));
        let principal = self.text("[data-test=login-principal]");
        self.click(&confirm);
        self.find("[data-test=vm-row]", Duration::from_secs(10));
        principal
    }

    /// Fills the command form's `fields` (input name, value) and clicks Run.
    pub fn run_form(&self, fields: &[(&str, &str)]) {
        for (name, value) in fields {
            let input = self.find(
                &format!("[data-test=command-form] input[name={name}]"),
                Duration::from_secs(10),
            );
            self.clear(&input);
            self.type_into(&input, value);
        }
        self.click(&self.find(
            "[data-test=command-form] [data-test=run]",
            Duration::from_secs(10),
        ));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.client.raw(
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                Vec::new(),
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
