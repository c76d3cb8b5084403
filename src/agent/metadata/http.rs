//! The metadata channel's HTTP, pure: a bounded request head in, the route, the response
//! bytes out. Only `GET` of four plain-text paths is answered; anything else is refused with
//! a status and no detail.

use super::Served;

/// The longest request head read; a guest's `wget` sends about 100 bytes.
pub(crate) const MAX_HEAD: usize = 2048;
/// The paths' common prefix.
const PREFIX: &str = "/ignis/v1/";

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Hostname,
    /// `key=value` lines, sorted by key.
    Labels,
    /// The claimant's userData, 404 when there is none.
    UserData,
    /// The version; with `wait`, answered once it differs from that (or the long-poll ends).
    Version {
        wait: Option<u64>,
    },
    /// A request this channel does not answer, with the status it gets.
    Refused(Status),
}

/// The statuses the channel answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    BadRequest,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    RequestTooLarge,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::Forbidden => "403 Forbidden",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::RequestTooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// How far the bytes read so far go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// No end of the head yet; read more.
    Incomplete,
    /// The head is complete: where it goes.
    Complete(Route),
}

/// Read the request head in `buf` (everything received so far).
pub(crate) fn parse_head(buf: &[u8]) -> Head {
    let end = find(buf, b"\r\n\r\n").or_else(|| find(buf, b"\n\n"));
    if end.is_none() {
        return if buf.len() >= MAX_HEAD {
            Head::Complete(Route::Refused(Status::RequestTooLarge))
        } else {
            Head::Incomplete
        };
    }
    let Ok(text) = std::str::from_utf8(buf) else {
        return Head::Complete(Route::Refused(Status::BadRequest));
    };
    let line = text.lines().next().unwrap_or_default();
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Head::Complete(Route::Refused(Status::BadRequest));
    };
    if !version.starts_with("HTTP/1.") {
        return Head::Complete(Route::Refused(Status::BadRequest));
    }
    Head::Complete(route(method, target))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where a request line's method and target go.
pub(crate) fn route(method: &str, target: &str) -> Route {
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let Some(name) = path.strip_prefix(PREFIX) else {
        return Route::Refused(Status::NotFound);
    };
    let found = match name {
        "hostname" => Route::Hostname,
        "labels" => Route::Labels,
        "user-data" => Route::UserData,
        "version" => match query.map(wait_of) {
            None => Route::Version { wait: None },
            Some(Some(wait)) => Route::Version { wait: Some(wait) },
            Some(None) => return Route::Refused(Status::BadRequest),
        },
        _ => return Route::Refused(Status::NotFound),
    };
    if method != "GET" {
        return Route::Refused(Status::MethodNotAllowed);
    }
    if query.is_some() && !matches!(found, Route::Version { .. }) {
        return Route::Refused(Status::BadRequest);
    }
    found
}

/// `wait=<n>`, the only query the channel knows.
fn wait_of(query: &str) -> Option<u64> {
    query.strip_prefix("wait=")?.parse().ok()
}

/// The status and body of a route, for what the guest serves.
pub(crate) fn answer(route: &Route, served: Option<&Served>) -> (Status, String) {
    let Route::Refused(status) = route else {
        let Some(served) = served else {
            return (Status::Forbidden, String::new());
        };
        let metadata = &served.metadata;
        return match route {
            Route::Hostname => (Status::Ok, format!("{}\n", metadata.hostname)),
            Route::Labels => (
                Status::Ok,
                metadata
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}\n"))
                    .collect(),
            ),
            Route::UserData => match &metadata.user_data {
                Some(data) => (Status::Ok, data.clone()),
                None => (Status::NotFound, String::new()),
            },
            Route::Version { .. } => (Status::Ok, format!("{}\n", served.version)),
            Route::Refused(status) => (*status, String::new()),
        };
    };
    (*status, String::new())
}

/// The response on the wire: HTTP/1.0, the connection closed after it.
pub(crate) fn encode(status: Status, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.0 {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        status.line(),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::GuestMetadata;

    fn served(user_data: Option<&str>) -> Served {
        Served::of(GuestMetadata {
            hostname: "web-1".into(),
            labels: [
                ("tier".to_string(), "front".to_string()),
                ("app".to_string(), "web".to_string()),
            ]
            .into(),
            user_data: user_data.map(str::to_string),
        })
    }

    #[test]
    fn a_busybox_wget_request_is_routed() {
        let head = b"GET /ignis/v1/version?wait=12 HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Wget\r\nConnection: close\r\n\r\n";
        assert_eq!(
            parse_head(head),
            Head::Complete(Route::Version { wait: Some(12) })
        );
        assert_eq!(parse_head(&head[..20]), Head::Incomplete);
        assert_eq!(
            parse_head(b"GET /ignis/v1/labels HTTP/1.0\n\n"),
            Head::Complete(Route::Labels)
        );
    }

    #[test]
    fn only_get_of_the_four_paths_is_answered() {
        use Status::*;
        assert_eq!(route("GET", "/ignis/v1/hostname"), Route::Hostname);
        assert_eq!(route("GET", "/ignis/v1/user-data"), Route::UserData);
        assert_eq!(
            route("GET", "/ignis/v1/version"),
            Route::Version { wait: None }
        );
        assert_eq!(
            route("POST", "/ignis/v1/hostname"),
            Route::Refused(MethodNotAllowed)
        );
        assert_eq!(route("GET", "/latest/meta-data/"), Route::Refused(NotFound));
        assert_eq!(
            route("GET", "/ignis/v1/../v1/hostname"),
            Route::Refused(NotFound)
        );
        assert_eq!(route("GET", "/ignis/v1/"), Route::Refused(NotFound));
        assert_eq!(
            route("GET", "/ignis/v1/version?wait=x"),
            Route::Refused(BadRequest)
        );
        assert_eq!(
            route("GET", "/ignis/v1/labels?x=1"),
            Route::Refused(BadRequest)
        );
        assert_eq!(
            parse_head(b"GET /ignis/v1/hostname\r\n\r\n"),
            Head::Complete(Route::Refused(BadRequest))
        );
        assert_eq!(
            parse_head(&[b'A'; MAX_HEAD]),
            Head::Complete(Route::Refused(RequestTooLarge))
        );
        assert_eq!(
            parse_head(b"GET /ignis/v1/hostname HTTP/1.1\r\n\xff\r\n\r\n"),
            Head::Complete(Route::Refused(BadRequest))
        );
    }

    #[test]
    fn answers_are_plain_text_a_shell_reads() {
        let with = served(Some("#cloud-config\nhostname: x\n"));
        assert_eq!(
            answer(&Route::Hostname, Some(&with)),
            (Status::Ok, "web-1\n".into())
        );
        assert_eq!(
            answer(&Route::Labels, Some(&with)),
            (Status::Ok, "app=web\ntier=front\n".into())
        );
        assert_eq!(
            answer(&Route::UserData, Some(&with)).1,
            "#cloud-config\nhostname: x\n"
        );
        assert_eq!(
            answer(&Route::UserData, Some(&served(None))).0,
            Status::NotFound
        );
        assert_eq!(
            answer(&Route::Version { wait: None }, Some(&with)).1,
            format!("{}\n", with.version)
        );
        assert_eq!(
            answer(&Route::Hostname, None).0,
            Status::Forbidden,
            "an address that is no guest's reads nothing"
        );
        let wire = String::from_utf8(encode(Status::Ok, "web-1\n")).expect("utf-8");
        assert!(wire.starts_with("HTTP/1.0 200 OK\r\n"), "{wire}");
        assert!(wire.contains("Content-Length: 6\r\n"), "{wire}");
        assert!(wire.ends_with("\r\n\r\nweb-1\n"), "{wire}");
    }
}
