//! An in-memory Kubernetes API behind `kube::Client::new`, served through a
//! tower-test mock service (the pattern of kube-rs's controller-rs), but
//! answering from a store instead of a script: GET, LIST (equality label
//! and field selectors), WATCH (every change after the asked
//! resourceVersion, deletions included, then the stream ends as a real
//! one times out), POST, PATCH (server-side apply as one field manager
//! sees it, and JSON merge patch, on objects and their `status`) and DELETE.
//!
//! It counts writes that changed something, which is how tests show a
//! second reconcile is a no-op.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// (API prefix, plural, namespace or "", name)
type Key = (String, String, String, String);

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    /// Deleted objects, with the resourceVersion of their deletion, for
    /// watches that started before it.
    deleted: Vec<(Key, Value)>,
    version: u64,
    /// "VERB plural/name" of every write that changed stored content.
    changes: Vec<String>,
    requests: u64,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
}

struct Path {
    prefix: String,
    plural: String,
    namespace: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Path> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *parts.first()? {
        "api" => (format!("/api/{}", parts.get(1)?), &parts[2..]),
        "apis" => (
            format!("/apis/{}/{}", parts.get(1)?, parts.get(2)?),
            &parts[3..],
        ),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (rest[1].to_string(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    Some(Path {
        prefix,
        plural: rest.first()?.to_string(),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        status: rest.get(2) == Some(&"status"),
    })
}

fn status_response(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string().into_bytes()))
        .unwrap()
}

fn ok(v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string().into_bytes()))
        .unwrap()
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

/// `spec.nodeName=n,metadata.name!=x`: equality and inequality on fields.
fn fields_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (path, want, equal) = match term.split_once("!=") {
            Some((p, v)) => (p, v, false),
            None => {
                let (p, v) = term.split_once('=').unwrap_or((term, ""));
                (p, v.trim_start_matches('='), true)
            }
        };
        let got = path
            .split('.')
            .fold(obj, |v, k| &v[k])
            .as_str()
            .unwrap_or("");
        (got == want) == equal
    })
}

fn version_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The content that matters for "did this write change anything".
fn content(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    v
}

impl Store {
    /// The watch events after `query`'s resourceVersion for the objects at
    /// `path`, as newline-separated JSON.
    fn watch_events(&self, path: &str, query: &str) -> Vec<u8> {
        let Some(p) = parse_path(path) else {
            return Vec::new();
        };
        let q: BTreeMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
        let since: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let labels = q.get("labelSelector").cloned().unwrap_or_default();
        let fields = q.get("fieldSelector").cloned().unwrap_or_default();
        let here = |k: &Key| {
            k.0 == p.prefix && k.1 == p.plural && (p.namespace.is_empty() || k.2 == p.namespace)
        };
        let mut events: Vec<(u64, &str, &Value)> = self
            .objects
            .iter()
            .filter(|(k, _)| here(k))
            .map(|(_, v)| (version_of(v), "MODIFIED", v))
            .chain(
                self.deleted
                    .iter()
                    .filter(|(k, _)| here(k))
                    .map(|(_, v)| (version_of(v), "DELETED", v)),
            )
            .filter(|(rv, _, v)| {
                *rv > since && labels_match(v, &labels) && fields_match(v, &fields)
            })
            .collect();
        events.sort_by_key(|e| e.0);
        let mut out = Vec::new();
        for (_, kind, v) in events {
            out.extend(json!({"type": kind, "object": v}).to_string().into_bytes());
            out.push(b'\n');
        }
        out
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut v = self.objects.remove(key)?;
        self.bump(&mut v);
        self.deleted.push((key.clone(), v.clone()));
        Some(v)
    }

    fn bump(&mut self, obj: &mut Value) {
        self.version += 1;
        obj["metadata"]["resourceVersion"] = json!(self.version.to_string());
    }

    fn create(&mut self, key: Key, mut obj: Value) -> Value {
        obj["metadata"]["name"] = json!(key.3);
        if !key.2.is_empty() {
            obj["metadata"]["namespace"] = json!(key.2);
        }
        obj["metadata"]["uid"] = json!(format!("uid-{}-{}", key.1, key.3));
        obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        obj["metadata"]["generation"] = json!(1);
        self.bump(&mut obj);
        self.changes.push(format!("CREATE {}/{}", key.1, key.3));
        self.objects.insert(key, obj.clone());
        obj
    }

    /// Stores `new` for `key` if its content differs from what is there.
    fn update(&mut self, key: Key, mut new: Value, verb: &str) -> Value {
        let old = self.objects.get(&key).cloned().unwrap_or(Value::Null);
        if content(&old) == content(&new) {
            return old;
        }
        if old.get("spec") != new.get("spec") {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            new["metadata"]["generation"] = json!(g);
        }
        self.bump(&mut new);
        self.changes.push(format!("{verb} {}/{}", key.1, key.3));
        self.objects.insert(key, new.clone());
        new
    }

    fn handle(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        ctype: &str,
        accept: &str,
        body: &[u8],
    ) -> Response<Body> {
        self.requests += 1;
        let Some(p) = parse_path(path) else {
            return status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no route {path}"),
            );
        };
        let q: BTreeMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return status_response(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("body: {e}"),
                    );
                }
            }
        };
        let key_of = |name: &str| {
            (
                p.prefix.clone(),
                p.plural.clone(),
                p.namespace.clone(),
                name.to_string(),
            )
        };
        let not_found = |name: &str| {
            status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} {name:?} not found", p.plural),
            )
        };
        match (method.clone(), &p.name) {
            (Method::GET, None) => {
                let selector = q.get("labelSelector").cloned().unwrap_or_default();
                let fields = q.get("fieldSelector").cloned().unwrap_or_default();
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(k, _)| {
                        k.0 == p.prefix
                            && k.1 == p.plural
                            && (p.namespace.is_empty() || k.2 == p.namespace)
                    })
                    .map(|(_, v)| v.clone())
                    .filter(|v| labels_match(v, &selector) && fields_match(v, &fields))
                    .collect();
                // A metadata-only list carries each item's metadata alone,
                // as the API server answers it.
                let (api_version, kind, items) = if accept.contains("as=PartialObjectMetadataList")
                {
                    let items = items
                        .iter()
                        .map(|v| {
                            json!({
                                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                                "metadata": v["metadata"],
                            })
                        })
                        .collect();
                    ("meta.k8s.io/v1", "PartialObjectMetadataList", items)
                } else {
                    ("v1", "List", items)
                };
                ok(&json!({
                    "apiVersion": api_version, "kind": kind,
                    "metadata": { "resourceVersion": self.version.to_string() },
                    "items": items,
                }))
            }
            (Method::GET, Some(name)) => match self.objects.get(&key_of(name)) {
                Some(v) => ok(v),
                None => not_found(name),
            },
            (Method::POST, None) => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let name = if name.is_empty() {
                    format!(
                        "{}{}",
                        body["metadata"]["generateName"].as_str().unwrap_or("obj-"),
                        self.version
                    )
                } else {
                    name
                };
                let key = key_of(&name);
                if self.objects.contains_key(&key) {
                    return status_response(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{} {name:?} already exists", p.plural),
                    );
                }
                ok(&self.create(key, body))
            }
            (Method::PATCH, Some(name)) => {
                let key = key_of(name);
                let old = self.objects.get(&key).cloned();
                let apply = ctype.starts_with("application/apply-patch");
                match (old, apply, p.status) {
                    (None, true, false) => ok(&self.create(key, body)),
                    (None, _, _) => not_found(name),
                    (Some(old), true, false) => {
                        // One field manager owns every field it sets: the
                        // object becomes the applied body plus what the
                        // server owns (identity, generation, status).
                        let mut new = body;
                        for k in [
                            "uid",
                            "creationTimestamp",
                            "generation",
                            "resourceVersion",
                            "deletionTimestamp",
                        ] {
                            if let Some(v) = old["metadata"].get(k) {
                                new["metadata"][k] = v.clone();
                            }
                        }
                        if let Some(s) = old.get("status") {
                            new["status"] = s.clone();
                        }
                        ok(&self.update(key, new, "APPLY"))
                    }
                    (Some(old), true, true) => {
                        let mut new = old;
                        new["status"] = body["status"].clone();
                        ok(&self.update(key, new, "APPLY-STATUS"))
                    }
                    (Some(old), false, status) => {
                        let mut new = old.clone();
                        let patch = if status {
                            json!({"status": body["status"].clone()})
                        } else {
                            body
                        };
                        merge(&mut new, &patch);
                        if !status {
                            // A merge patch cannot change status through the main resource.
                            match old.get("status") {
                                Some(s) => new["status"] = s.clone(),
                                None => {
                                    new.as_object_mut().unwrap().remove("status");
                                }
                            }
                        }
                        ok(&self.update(key, new, if status { "PATCH-STATUS" } else { "PATCH" }))
                    }
                }
            }
            (Method::PUT, Some(name)) => {
                let key = key_of(name);
                if !self.objects.contains_key(&key) {
                    return not_found(name);
                }
                ok(&self.update(key, body, "PUT"))
            }
            (Method::DELETE, Some(name)) => match self.remove(&key_of(name)) {
                Some(v) => {
                    let how = body
                        .get("propagationPolicy")
                        .and_then(Value::as_str)
                        .map(|p| format!(" propagationPolicy={p}"))
                        .unwrap_or_default();
                    self.changes
                        .push(format!("DELETE {}/{name}{how}", p.plural));
                    ok(&v)
                }
                None => not_found(name),
            },
            _ => status_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} {path}"),
            ),
        }
    }
}

fn key_for<K: Resource<DynamicType = ()>>(ns: Option<&str>, name: &str) -> Key {
    let url = K::url_path(&(), ns);
    let p = parse_path(&url).expect("a resource URL");
    (p.prefix, p.plural, p.namespace, name.to_string())
}

impl FakeApi {
    /// A client whose every request this fake answers.
    pub fn client() -> (Client, FakeApi) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = FakeApi::default();
        let store = fake.store.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let header = |name: &str| {
                    parts
                        .headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let (ctype, accept) = (header("content-type"), header("accept"));
                // A watch gets what changed since its resourceVersion at
                // once, or, with nothing new, an empty stream after a pause,
                // as if the server had timed it out; watchers watch again.
                if let Some(q) = parts.uri.query().filter(|q| q.contains("watch=true")) {
                    let events = store.lock().unwrap().watch_events(parts.uri.path(), q);
                    tokio::spawn(async move {
                        if events.is_empty() {
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        }
                        send.send_response(
                            Response::builder()
                                .status(StatusCode::OK)
                                .body(Body::from(events))
                                .unwrap(),
                        );
                    });
                    continue;
                }
                let resp = store.lock().unwrap().handle(
                    &parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or(""),
                    &ctype,
                    &accept,
                    &bytes,
                );
                send.send_response(resp);
            }
        });
        (Client::new(svc, "default"), fake)
    }

    /// Stores `obj` as if someone had created it (its namespace and name
    /// from its metadata).
    pub fn insert<K: Resource<DynamicType = ()> + Serialize>(&self, obj: &K) {
        let key = key_for::<K>(
            obj.meta().namespace.as_deref(),
            obj.meta().name.as_deref().unwrap(),
        );
        let v = serde_json::to_value(obj).unwrap();
        self.store.lock().unwrap().create(key, v);
    }

    pub fn get<K: Resource<DynamicType = ()> + DeserializeOwned>(
        &self,
        ns: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let v = self
            .store
            .lock()
            .unwrap()
            .objects
            .get(&key_for::<K>(ns, name))
            .cloned()?;
        Some(serde_json::from_value(v).unwrap())
    }

    pub fn list<K: Resource<DynamicType = ()> + DeserializeOwned>(
        &self,
        ns: Option<&str>,
    ) -> Vec<K> {
        let (prefix, plural, namespace, _) = key_for::<K>(ns, "");
        self.store
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| {
                k.0 == prefix && k.1 == plural && (namespace.is_empty() || k.2 == namespace)
            })
            .map(|(_, v)| serde_json::from_value(v.clone()).unwrap())
            .collect()
    }

    /// Sets an object's status as its own controller would (a StatefulSet's
    /// ready replicas, a claim's capacity).
    pub fn set_status<K: Resource<DynamicType = ()>>(
        &self,
        ns: Option<&str>,
        name: &str,
        status: Value,
    ) {
        let key = key_for::<K>(ns, name);
        let mut s = self.store.lock().unwrap();
        let mut v = s
            .objects
            .get(&key)
            .cloned()
            .expect("object to set status on");
        v["status"] = status;
        s.update(key, v, "TEST-STATUS");
    }

    /// Merges `patch` into an object as a user would (`kubectl patch`).
    pub fn patch<K: Resource<DynamicType = ()>>(&self, ns: Option<&str>, name: &str, patch: Value) {
        let key = key_for::<K>(ns, name);
        let mut s = self.store.lock().unwrap();
        let mut v = s.objects.get(&key).cloned().expect("object to patch");
        merge(&mut v, &patch);
        s.update(key, v, "TEST-PATCH");
    }

    pub fn delete<K: Resource<DynamicType = ()>>(&self, ns: Option<&str>, name: &str) {
        let key = key_for::<K>(ns, name);
        self.store.lock().unwrap().remove(&key);
    }

    /// Writes so far that changed something ("VERB plural/name").
    pub fn changes(&self) -> Vec<String> {
        self.store.lock().unwrap().changes.clone()
    }

    pub fn requests(&self) -> u64 {
        self.store.lock().unwrap().requests
    }

    /// Every stored object's "plural/name", for failure messages.
    pub fn names(&self) -> Vec<String> {
        self.store
            .lock()
            .unwrap()
            .objects
            .keys()
            .map(|k| format!("{}/{}", k.1, k.3))
            .collect()
    }
}
