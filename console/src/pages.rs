//! The HTML the server writes itself: the shell every console page loads (the page is
//! then drawn by `assets/app.js` from the public API), and the login page. Anything put in
//! them is escaped; neither has inline script or style.

use std::fmt::Write as _;

/// Escapes text for HTML content and double-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The head every page shares.
fn head(title: &str, extra: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         {extra}<title>{}</title>\n\
         <link rel=\"stylesheet\" href=\"{}\">\n",
        escape(title),
        crate::assets::STYLE.path(),
    )
}

/// The shell of every console page for a session of `principal` with CSRF token `csrf`.
pub fn shell(principal: &str, csrf: &str) -> String {
    let (principal, csrf) = (escape(principal), escape(csrf));
    let mut s = head(
        "Portless console",
        &format!(
            "<meta name=\"portless-csrf\" content=\"{csrf}\">\n\
             <meta name=\"portless-principal\" content=\"{principal}\">\n"
        ),
    );
    let _ = write!(
        s,
        "<script type=\"module\" src=\"{}\"></script>\n</head><body>\n\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\n\
         <header class=\"top\"><a class=\"brand\" href=\"/console/\">Portless</a>\
         <nav id=\"nav\" aria-label=\"Main\"></nav>\
         <span id=\"who\" data-test=\"who\">{principal}</span>\
         <form method=\"post\" action=\"/console/logout\" id=\"logout\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\" data-test=\"logout\">Log out</button></form></header>\n\
         <main id=\"main\" tabindex=\"-1\"><p>Loading…</p>\
         <noscript><p>The console needs JavaScript; the CLI (<code>portless</code>) does \
         everything without it.</p></noscript></main>\n\
         <div id=\"status\" role=\"status\" aria-live=\"polite\"></div>\n\
         </body></html>\n",
        crate::assets::APP.path(),
    );
    s
}

/// What the login page says above its form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginNotice {
    /// Nothing: the plain form.
    None,
    /// A valid code in the URL: confirm logging in as this principal.
    Confirm {
        /// The code.
        code: String,
        /// Its principal.
        principal: String,
    },
    /// Why the last attempt failed, or why the session ended.
    Problem(String),
    /// Logged out.
    LoggedOut,
}

/// The login page: a code (from `portless console`) or a bearer token.
pub fn login(notice: &LoginNotice) -> String {
    let mut s = head("Log in: Portless console", "");
    s.push_str("</head><body class=\"login\">\n<main id=\"main\">\n<h1>Portless console</h1>\n");
    match notice {
        LoginNotice::None => {}
        LoginNotice::LoggedOut => {
            s.push_str("<p class=\"notice\" role=\"status\" data-test=\"login-notice\">You are logged out.</p>\n");
        }
        LoginNotice::Problem(p) => {
            let _ = writeln!(
                s,
                "<p class=\"problem\" role=\"alert\" data-test=\"login-problem\">{}</p>",
                escape(p)
            );
        }
        LoginNotice::Confirm { code, principal } => {
            let _ = write!(
                s,
                "<form method=\"post\" action=\"/console/login\" class=\"card\">\n\
                 <p>This code logs you in as principal <strong data-test=\"login-principal\">{}</strong>.</p>\n\
                 <input type=\"hidden\" name=\"code\" value=\"{}\">\n\
                 <button type=\"submit\" data-test=\"login-confirm\">Log in</button>\n</form>\n",
                escape(principal),
                escape(code)
            );
        }
    }
    s.push_str(
        "<form method=\"post\" action=\"/console/login\" class=\"card\">\n\
         <h2>Log in with a code</h2>\n\
         <p>Run <code>portless console</code> on the host: it prints a link with a one-time code.</p>\n\
         <label for=\"code\">Login code</label>\n\
         <input id=\"code\" name=\"code\" autocomplete=\"off\" spellcheck=\"false\" required data-test=\"login-code\">\n\
         <button type=\"submit\">Log in</button>\n</form>\n\
         <form method=\"post\" action=\"/console/login\" class=\"card\">\n\
         <h2>Log in with a token</h2>\n\
         <label for=\"token\">Bearer token</label>\n\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required data-test=\"login-token\">\n\
         <button type=\"submit\" data-test=\"login-token-submit\">Log in</button>\n</form>\n\
         </main></body></html>\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_everywhere() {
        let page = shell("<b>\"x'", "c&d");
        assert!(page.contains("&lt;b&gt;&quot;x&#39;"));
        assert!(page.contains("content=\"c&amp;d\""));
        assert!(!page.contains("<b>"));
        let page = login(&LoginNotice::Problem("<script>".into()));
        assert!(page.contains("&lt;script&gt;") && !page.contains("<script>"));
    }

    /// Whether `page` has an attribute like ` onclick=`.
    fn has_handler_attribute(page: &str) -> bool {
        page.match_indices(" on").any(|(at, _)| {
            let rest = &page[at + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }

    #[test]
    fn no_inline_script_or_style() {
        assert!(has_handler_attribute("<a onclick=x>"));
        assert!(!has_handler_attribute("<p>run it on the host</p>"));
        for page in [
            shell("p", "c"),
            login(&LoginNotice::None),
            login(&LoginNotice::Confirm {
                code: "c".into(),
                principal: "p".into(),
            }),
        ] {
            assert!(!page.contains("style="), "{page}");
            assert!(!page.contains("<style"), "{page}");
            assert!(!has_handler_attribute(&page), "{page}");
            for script in page.split("<script").skip(1) {
                assert!(script.starts_with(" type=\"module\" src=\""), "{page}");
            }
        }
    }
}
