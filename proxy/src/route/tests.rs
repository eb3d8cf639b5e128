use std::collections::HashMap;

use http::{HeaderMap, Method};

use super::*;
use crate::config::schema::RouteDecl;

fn route(toml_text: &str) -> Route {
    let decl: RouteDecl = toml::from_str(toml_text).expect("route toml");
    let clusters: HashMap<&str, usize> = [("a", 0), ("b", 1)].into_iter().collect();
    let config = crate::config::route::validate(0, &decl, &clusters).expect("valid");
    compile(&config, Vec::new()).expect("compiles")
}

fn table(routes: &[&str]) -> RouteTable {
    RouteTable::new(routes.iter().map(|r| route(r)).collect())
}

#[test]
fn first_match_wins_and_host_ignores_port_and_case() {
    let t = table(&[
        "name='r1'\ncluster='a'\nmatch={host='Reviews', prefix='/v1'}",
        "name='r2'\ncluster='b'\nmatch={host='reviews'}",
    ]);
    let h = HeaderMap::new();
    let get = Method::GET;
    assert_eq!(
        &*t.find("reviews:9080", "/v1/x", &get, &h).unwrap().1.name,
        "r1"
    );
    assert_eq!(&*t.find("REVIEWS", "/v2", &get, &h).unwrap().1.name, "r2");
    assert!(t.find("ratings", "/v1", &get, &h).is_none());
}

#[test]
fn wildcard_host_regex_method_headers() {
    let t = table(&[
        "name='re'\ncluster='a'\nmatch={host='*.svc', regex='/items/[0-9]+'}",
        "name='post'\ncluster='a'\nmatch={method='post'}",
        "name='hdr'\ncluster='b'\nmatch={headers={x-env='canary'}}",
    ]);
    let mut h = HeaderMap::new();
    assert_eq!(
        &*t.find("api.svc", "/items/42", &Method::GET, &h)
            .unwrap()
            .1
            .name,
        "re"
    );
    assert!(t.find("api.svc", "/items/42/x", &Method::GET, &h).is_none());
    assert!(t.find("svc", "/items/42", &Method::GET, &h).is_none());
    assert_eq!(
        &*t.find("x", "/", &Method::POST, &h).unwrap().1.name,
        "post"
    );
    h.insert("x-env", "canary".parse().unwrap());
    assert_eq!(&*t.find("x", "/", &Method::GET, &h).unwrap().1.name, "hdr");
}

#[test]
fn weighted_pick_follows_weights() {
    let r = route("clusters=[{name='a', weight=90},{name='b', weight=10}]");
    let picks: Vec<usize> = (0..100).map(|i| r.pick_cluster(i)).collect();
    assert_eq!(picks.iter().filter(|c| **c == 0).count(), 90);
    assert_eq!(picks.iter().filter(|c| **c == 1).count(), 10);
}

#[test]
fn prefix_rewrite() {
    let r = route("cluster='a'\nrewrite_prefix='/'\nmatch={prefix='/api'}");
    assert_eq!(r.rewrite_path("/api/users?x=1"), "/users?x=1");
    assert_eq!(r.rewrite_path("/api"), "/");
    let r = route("cluster='a'\nrewrite_prefix='/v2/'\nmatch={prefix='/v1/'}");
    assert_eq!(r.rewrite_path("/v1/items"), "/v2/items");
}

#[test]
fn unknown_cluster_is_an_error() {
    let decl: RouteDecl = toml::from_str("cluster='nope'").unwrap();
    let clusters = HashMap::new();
    let e = crate::config::route::validate(0, &decl, &clusters).unwrap_err();
    assert!(
        e.message.contains("unknown cluster \"nope\""),
        "{}",
        e.message
    );
    assert!(e.span.is_some());
}
