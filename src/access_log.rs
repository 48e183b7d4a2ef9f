//! The access log: one line per request to stderr, as text in the layout of the other log lines (default) or,
//! with `LOG_FORMAT=json`, as one JSON object per line. Written directly, in one write per line, when the `log`
//! level lets `access` INFO lines through.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The fields of one access line.
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub client: IpAddr,
    /// The name of the client key (`client_keys`), `-` when none was checked; never the key.
    pub client_name: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub instance: Option<&'a str>,
    pub attempts: usize,
    pub duration: Duration,
    pub bytes: u64,
    pub note: Option<&'static str>,
}

/// Writes the access line of one request, in one `write(2)`: lines from several workers never interleave, and a
/// line costs one syscall (through `log` it took one per formatted piece).
pub fn write(entry: &Entry, json: bool) {
    if !log::log_enabled!(target: "access", log::Level::Info) {
        return;
    }
    let mut line = if json { json_line(entry) } else { text_line(entry) };
    line.push(b'\n');
    let _ = std::io::stderr().lock().write_all(&line);
}

/// The text form, as the other log lines look (`simple_logger`'s layout: UTC time, level, target). Built piece
/// by piece: one `format!` of eleven fields was the costliest part of writing the line (callgrind).
fn text_line(entry: &Entry) -> Vec<u8> {
    let mut line = String::with_capacity(256);
    push_timestamp(&mut line, SystemTime::now());
    line.push_str(" INFO  [access] ");
    line.push_str(entry.request_id);
    let _ = write!(line, " client={}", entry.client);
    push_field(&mut line, "client_name", entry.client_name);
    push_field(&mut line, "method", entry.method);
    push_field(&mut line, "path", &printable(entry.path));
    push_number(&mut line, "status", u64::from(entry.status));
    push_field(&mut line, "instance", entry.instance.unwrap_or("-"));
    push_number(&mut line, "attempts", entry.attempts as u64);
    push_number(&mut line, "duration_ms", u64::try_from(entry.duration.as_millis()).unwrap_or(u64::MAX));
    push_number(&mut line, "bytes", entry.bytes);
    if let Some(note) = entry.note {
        push_field(&mut line, "note", note);
    }
    line.into_bytes()
}

fn push_field(line: &mut String, name: &str, value: &str) {
    line.push(' ');
    line.push_str(name);
    line.push('=');
    line.push_str(value);
}

fn push_number(line: &mut String, name: &str, value: u64) {
    push_field(line, name, "");
    push_digits(line, value, 1);
}

/// One JSON object, from its first byte (the `log` crate's logger would put its own prefix in front).
fn json_line(entry: &Entry) -> Vec<u8> {
    let object = serde_json::json!({
        "ts": utc_timestamp(SystemTime::now()),
        "level": "INFO",
        "request_id": entry.request_id,
        "client": entry.client.to_string(),
        "client_name": entry.client_name,
        "method": entry.method,
        "path": printable(entry.path),
        "status": entry.status,
        "instance": entry.instance,
        "attempts": entry.attempts,
        "duration_ms": entry.duration.as_millis() as u64,
        "bytes": entry.bytes,
        "note": entry.note,
    });
    serde_json::to_vec(&object).unwrap_or_default()
}

/// The path as it may appear in a log line: at most 256 characters; it is already visible ASCII when valid (then
/// it is not copied).
fn printable(path: &str) -> Cow<'_, str> {
    if path.len() <= 256 && path.bytes().all(|b| b.is_ascii_graphic()) {
        return Cow::Borrowed(path);
    }
    Cow::Owned(path.chars().take(256).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect())
}

/// `2026-11-25T14:09:06.861Z`, the same form as the text log's timestamps.
fn utc_timestamp(t: SystemTime) -> String {
    let mut out = String::with_capacity(24);
    push_timestamp(&mut out, t);
    out
}

/// Appends `t` as `utc_timestamp` shows it. Digits are written by hand: through `format!` this was 3.5 % of a
/// proxied request's instructions (callgrind).
fn push_timestamp(out: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let fields = [
        (year, 4, '-'),
        (month, 2, '-'),
        (day, 2, 'T'),
        (rem / 3600, 2, ':'),
        (rem % 3600 / 60, 2, ':'),
        (rem % 60, 2, '.'),
        (i64::from(d.subsec_millis()), 3, 'Z'),
    ];
    for (value, width, then) in fields {
        push_digits(out, value.unsigned_abs(), width);
        out.push(then);
    }
}

/// `value` in decimal, zero-padded to `width` digits (wider values keep all their digits).
fn push_digits(out: &mut String, value: u64, width: u32) {
    let digits = value.checked_ilog10().unwrap_or(0) + 1;
    for _ in digits..width {
        out.push('0');
    }
    for i in (0..digits).rev() {
        out.push(char::from(b'0' + (value / 10u64.pow(i) % 10) as u8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_164_800_123);
        assert_eq!(utc_timestamp(t), "2024-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(utc_timestamp(t), "1994-11-06T08:49:37.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
        assert_eq!(utc_timestamp(t), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn text_line_fields() {
        let mut entry = Entry {
            request_id: "rid-1",
            client: "10.0.0.7".parse().expect("ip"),
            client_name: "team-a",
            method: "POST",
            path: "/openai/x\u{7f}y",
            status: 200,
            instance: Some("east"),
            attempts: 2,
            duration: Duration::from_micros(1_234_567),
            bytes: 0,
            note: None,
        };
        let line = String::from_utf8(text_line(&entry)).expect("utf-8");
        let (ts, rest) = line.split_at(24);
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{line}");
        assert_eq!(
            rest,
            " INFO  [access] rid-1 client=10.0.0.7 client_name=team-a method=POST path=/openai/x?y status=200 \
             instance=east attempts=2 duration_ms=1234 bytes=0"
        );
        entry.note = Some("client_gone");
        entry.instance = None;
        let line = String::from_utf8(text_line(&entry)).expect("utf-8");
        assert!(line.ends_with(" instance=- attempts=2 duration_ms=1234 bytes=0 note=client_gone"), "{line}");
    }
}
