//! Compares what a case observed with what its `[case.expect]` asks for.
//! Only what the fixture writes is checked; each difference names the
//! field as the fixture file spells it (`response.headers.x-team`,
//! `upstream.body`, `metrics."name"`, `callouts[0].path`, `logs[1]`).

use http::HeaderMap;

use super::fixture::{Expect, ExpectCallout, Headers};
use super::run::{Observed, SeenRequest};

/// One difference between the fixture and what happened.
#[derive(Debug, PartialEq)]
pub struct Mismatch {
    pub field: String,
    pub expected: String,
    pub got: String,
}

fn quoted(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

fn values(map: &HeaderMap, name: &str) -> Vec<String> {
    map.get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

fn show(list: &[String]) -> String {
    match list {
        [] => "(absent)".to_string(),
        [one] => format!("{one:?}"),
        many => format!("{many:?}"),
    }
}

struct Diff(Vec<Mismatch>);

impl Diff {
    fn push(&mut self, field: impl Into<String>, expected: String, got: String) {
        self.0.push(Mismatch {
            field: field.into(),
            expected,
            got,
        });
    }

    fn text(&mut self, field: &str, expected: &Option<String>, got: &str) {
        if let Some(e) = expected {
            if e != got {
                self.push(field, format!("{e:?}"), format!("{got:?}"));
            }
        }
    }

    /// A flag that is false unless the fixture says otherwise.
    fn flag(&mut self, field: &str, expected: Option<bool>, got: bool) {
        let want = expected.unwrap_or(false);
        if want != got {
            self.push(field, want.to_string(), got.to_string());
        }
    }

    fn body(&mut self, field: &str, expected: &Option<String>, got: &[u8]) {
        if let Some(e) = expected {
            if e.as_bytes() != got {
                self.push(field, format!("{e:?}"), quoted(got));
            }
        }
    }

    fn headers(&mut self, field: &str, expected: &Headers, got: &HeaderMap) {
        for (name, want) in expected {
            let want = want.list();
            let have = values(got, &name.to_ascii_lowercase());
            if want != have {
                self.push(format!("{field}.{name}"), show(&want), show(&have));
            }
        }
    }

    fn absent(&mut self, field: &str, names: &[String], got: &HeaderMap) {
        for name in names {
            let have = values(got, &name.to_ascii_lowercase());
            if !have.is_empty() {
                self.push(format!("{field}.{name}"), "(absent)".into(), show(&have));
            }
        }
    }
}

/// Every difference, in the order of the fixture's fields.
pub fn compare(expect: &Expect, seen: &Observed) -> Vec<Mismatch> {
    let mut d = Diff(Vec::new());
    match (&expect.load_error, &seen.load_error) {
        (Some(want), Some(got)) if got.contains(want.as_str()) => return d.0,
        (Some(want), got) => {
            d.push(
                "load_error",
                format!("a load error containing {want:?}"),
                got.as_ref()
                    .map_or("the filter loaded".to_string(), |g| format!("{g:?}")),
            );
            return d.0;
        }
        (None, Some(got)) => {
            d.push("load", "the filter loads".into(), got.clone());
            return d.0;
        }
        (None, None) => {}
    }
    if let Some(u) = &expect.upstream {
        let want_reached = u.reached.unwrap_or(true);
        match (&seen.upstream, want_reached) {
            (None, true) => d.push(
                "upstream.reached",
                "true".into(),
                format!(
                    "false (the client got {} {})",
                    seen.response.status,
                    quoted(&seen.response.body)
                ),
            ),
            (Some(_), false) => d.push("upstream.reached", "false".into(), "true".into()),
            (None, false) => {}
            (Some(req), true) => {
                d.text("upstream.cluster", &u.cluster, &req.cluster);
                d.flag("upstream.cut", u.cut, req.cut);
                d.text("upstream.method", &u.method, &req.method);
                d.text("upstream.path", &u.path, &req.path);
                d.headers("upstream.headers", &u.headers, &req.headers);
                d.absent("upstream.headers", &u.absent, &req.headers);
                d.body("upstream.body", &u.body, &req.body);
                d.headers("upstream.trailers", &u.trailers, &req.trailers);
            }
        }
    }
    if let Some(r) = &expect.response {
        let got = &seen.response;
        if let Some(status) = r.status {
            if status != got.status {
                d.push(
                    "response.status",
                    status.to_string(),
                    format!("{} (body {})", got.status, quoted(&got.body)),
                );
            }
        }
        d.flag("response.cut", r.cut, got.cut);
        d.headers("response.headers", &r.headers, &got.headers);
        d.absent("response.headers", &r.absent, &got.headers);
        d.body("response.body", &r.body, &got.body);
        d.headers("response.trailers", &r.trailers, &got.trailers);
    }
    logs(&mut d, &expect.logs, &seen.logs);
    for (key, want) in &expect.metrics {
        let got = metric(&seen.metrics, key);
        match got {
            Some(v) if (v - want).abs() < 1e-9 => {}
            Some(v) => d.push(
                format!("metrics.\"{key}\""),
                want.to_string(),
                v.to_string(),
            ),
            None => d.push(
                format!("metrics.\"{key}\""),
                want.to_string(),
                match sample_names(&seen.metrics) {
                    names if names.is_empty() => {
                        "(no such sample; the filter defined no metrics)".to_string()
                    }
                    names => format!(
                        "(no such sample; the filter's metrics: {})",
                        names.join(", ")
                    ),
                },
            ),
        }
    }
    if let Some(want) = &expect.callouts {
        callouts(&mut d, want, &seen.callouts);
    }
    d.0
}

/// Each expected fragment in its own line, in order.
fn logs(d: &mut Diff, want: &[String], got: &[String]) {
    let mut from = 0;
    for (i, fragment) in want.iter().enumerate() {
        match got
            .iter()
            .skip(from)
            .position(|l| l.contains(fragment.as_str()))
        {
            Some(p) => from += p + 1,
            None => {
                let lines = if got.is_empty() {
                    "(the filter logged nothing)".to_string()
                } else {
                    format!("the filter's lines were:\n{}", indent(got))
                };
                d.push(
                    format!("logs[{i}]"),
                    format!(
                        "a line containing {fragment:?}{}",
                        if i > 0 { " after the previous one" } else { "" }
                    ),
                    lines,
                );
                return;
            }
        }
    }
}

fn indent(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| format!("            {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn callouts(d: &mut Diff, want: &[ExpectCallout], got: &[SeenRequest]) {
    if want.len() != got.len() {
        let made: Vec<String> = got
            .iter()
            .map(|c| format!("{} {} {}", c.cluster, c.method, c.path))
            .collect();
        d.push(
            "callouts",
            format!("{} calls", want.len()),
            format!("{} calls {made:?}", got.len()),
        );
    }
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        d.text(&format!("callouts[{i}].cluster"), &w.cluster, &g.cluster);
        d.text(&format!("callouts[{i}].method"), &w.method, &g.method);
        d.text(&format!("callouts[{i}].path"), &w.path, &g.path);
        d.headers(&format!("callouts[{i}].headers"), &w.headers, &g.headers);
        d.body(&format!("callouts[{i}].body"), &w.body, &g.body);
    }
}

/// A key `name` or `name{label="v",...}`: the sum of the samples of that
/// name carrying every given label.
pub fn metric(text: &str, key: &str) -> Option<f64> {
    let (name, labels) = match key.split_once('{') {
        Some((n, rest)) => (n, rest.trim_end_matches('}')),
        None => (key, ""),
    };
    let wanted: Vec<&str> = labels
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        if line.get(..end) != Some(name) {
            continue;
        }
        let sample_labels = line.get(end..).unwrap_or("");
        let sample_labels = sample_labels
            .strip_prefix('{')
            .and_then(|s| s.split_once('}'))
            .map_or("", |(l, _)| l);
        if !wanted.iter().all(|w| sample_labels.contains(w)) {
            continue;
        }
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// Sample names in a Prometheus text, wasp's own `wasp_*` left out.
fn sample_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("wasp_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE a counter\na{filter=\"f\"} 3\nb{filter=\"f\",route=\"x\"} 1\nb{filter=\"f\",route=\"y\"} 2\n";

    #[test]
    fn metrics_are_found_by_name_and_labels() {
        assert_eq!(metric(TEXT, "a"), Some(3.0));
        assert_eq!(metric(TEXT, "b"), Some(3.0));
        assert_eq!(metric(TEXT, "b{route=\"y\"}"), Some(2.0));
        assert_eq!(metric(TEXT, "c"), None);
    }

    #[test]
    fn logs_match_in_order() {
        let got = vec!["info: one".to_string(), "info: two".to_string()];
        let mut d = Diff(Vec::new());
        logs(&mut d, &["one".into(), "two".into()], &got);
        assert!(d.0.is_empty());
        logs(&mut d, &["two".into(), "one".into()], &got);
        assert_eq!(d.0.len(), 1);
        assert_eq!(d.0[0].field, "logs[1]");
    }
}
