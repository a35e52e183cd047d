//! The `http` router: status codes and JSON of each endpoint, the admin
//! endpoints off by default and behind a bearer token when on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use http_body_util::BodyExt;
use kontext::http::{HttpSettings, router};
use kontext::prelude::*;
use kontext::testing::{track, unique_name};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Parcel {
    id: u32,
}

async fn started(topic: &str) -> Arc<Kontext> {
    let model = Model::builder()
        .topic::<Parcel>(|t| t.name(topic).partitions(2).key(|p| p.id))
        .build()
        .unwrap();
    let k = Kontext::builder(model)
        .broker(broker())
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(unique_name("http"))))
        .producer()
        .consumers(|c| {
            c.handler(|_p: Parcel, _ctx: MessageContext| async { Ok(()) });
        })
        .start()
        .await
        .unwrap();
    Arc::new(k)
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, json, text)
}

async fn shut(k: Arc<Kontext>) {
    let k = Arc::into_inner(k).expect("the router was dropped");
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn read_only_router_serves_health_status_and_the_page_and_no_admin() {
    let topic = unique_name("http-ro");
    let k = started(&topic).await;
    let app = router(&k, HttpSettings::read_only());

    let (code, live, _) = call(&app, "GET", "/health/live", None, None).await;
    assert_eq!(code, StatusCode::OK, "{live}");
    assert_eq!(live["live"], json!(true));
    // Ready once its consumer joined the group: 503 with the reason before.
    wait_until("ready over http", async || {
        let (code, body, _) = call(&app, "GET", "/health/ready", None, None).await;
        match code {
            StatusCode::OK => ready(body["ready"] == json!(true), || body.to_string()),
            StatusCode::SERVICE_UNAVAILABLE if body["reasons"][0].is_string() => {
                Err(body.to_string())
            }
            _ => panic!("{code}: {body}"),
        }
    })
    .await;

    let (code, status, _) = call(&app, "GET", "/status", None, None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(status["admin"], json!(false));
    assert_eq!(status["types"][0]["type"], json!("Parcel"));
    assert_eq!(status["types"][0]["topic"], json!(topic));
    assert_eq!(status["topics"][0]["partitions"], json!(2));
    assert_eq!(status["services"][0]["state"], json!("running"));
    assert!(status["outbox"].is_null());

    let (code, _, page) = call(&app, "GET", "/", None, None).await;
    assert_eq!(code, StatusCode::OK);
    assert!(page.contains("<title>kontext</title>"));

    for path in [
        "/admin/pause",
        "/admin/resume",
        "/admin/seek",
        "/admin/replay",
    ] {
        let (code, body, _) = call(
            &app,
            "POST",
            path,
            Some("x"),
            Some(json!({"type": "Parcel"})),
        )
        .await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    drop(app);
    shut(k).await;
}

#[tokio::test]
async fn admin_endpoints_need_the_token_and_pause_resume_and_seek() {
    let topic = unique_name("http-admin");
    let k = started(&topic).await;
    let token = "s3cret-token-for-tests";
    let app = router(&k, HttpSettings::read_only().admin_token(token));

    let pause = json!({"type": "Parcel"});
    let (code, _, _) = call(&app, "POST", "/admin/pause", None, Some(pause.clone())).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _, _) = call(
        &app,
        "POST",
        "/admin/pause",
        Some("wrong"),
        Some(pause.clone()),
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _, _) = call(&app, "GET", "/admin/outbox/failed", None, None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);

    // Paused over HTTP: the status says so.
    let (code, body, _) = call(&app, "POST", "/admin/pause", Some(token), Some(pause)).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["outcome"]["outcome"], json!("applied"));
    let (_, status, _) = call(&app, "GET", "/status", None, None).await;
    assert_eq!(status["types"][0]["held"], json!(true), "{status}");
    assert_eq!(status["admin"], json!(true));

    let (code, body, _) = call(
        &app,
        "POST",
        "/admin/resume",
        Some(token),
        Some(json!({"type": "Parcel"})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (_, status, _) = call(&app, "GET", "/status", None, None).await;
    assert_eq!(status["types"][0]["held"], json!(false), "{status}");

    // A seek: records handled again from the beginning.
    let sent = track([&*k])
        .timeout(Duration::from_secs(30))
        .run(|| async {
            let p = k.producer().unwrap();
            for id in 0..4 {
                p.produce(&Parcel { id }).await.unwrap();
            }
        })
        .await
        .unwrap();
    assert_eq!(sent.activity.of::<Parcel>(&k).unwrap().handled, 4);
    let (code, body, _) = call(
        &app,
        "POST",
        "/admin/seek",
        Some(token),
        Some(json!({"type": "Parcel"})),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "a seek needs `to`: {body}");
    let (code, body, _) = call(
        &app,
        "POST",
        "/admin/seek",
        Some(token),
        Some(json!({"topic": topic, "to": "beginning"})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    wait_until("the parcels handled again", async || {
        let handled = k.registry().type_status::<Parcel>().unwrap().handled;
        ready(handled == 8, || format!("{handled} handled"))
    })
    .await;

    // Each owned partition's committed offset, end and lag, from the
    // consumer's statistics (every 5 s).
    wait_until("the partitions' positions", async || {
        let (_, status, _) = call(&app, "GET", "/status", None, None).await;
        let parts = status["services"][0]["partitions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // Each partition caught up: committed at its end, no lag, all known.
        let caught_up = |p: &Value| {
            p["committed"].is_i64() && p["committed"] == p["end"] && p["lag"] == json!(0)
        };
        let total: i64 = parts.iter().filter_map(|p| p["end"].as_i64()).sum();
        ready(
            parts.len() == 2 && parts.iter().all(caught_up) && total == 4,
            || status["services"][0]["partitions"].to_string(),
        )
    })
    .await;

    // Unknown names and malformed bodies are the caller's error.
    let (code, _, _) = call(
        &app,
        "POST",
        "/admin/pause",
        Some(token),
        Some(json!({"type": "Nope"})),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (code, _, _) = call(
        &app,
        "POST",
        "/admin/pause",
        Some(token),
        Some(json!([1, 2])),
    )
    .await;
    assert!(code.is_client_error(), "{code}");
    // A dry-run replay of the (empty) dead-letter topic, and no outbox here.
    let dlt = k
        .registry()
        .type_status::<Parcel>()
        .unwrap()
        .dead_letter_topic;
    let (code, body, _) = call(
        &app,
        "POST",
        "/admin/replay",
        Some(token),
        Some(json!({"dead_letter_topic": dlt, "dry_run": true})),
    )
    .await;
    assert!(
        code == StatusCode::OK || code == StatusCode::UNPROCESSABLE_ENTITY,
        "{code}: {body}"
    );
    let (code, body, _) = call(&app, "GET", "/admin/outbox/failed", Some(token), None).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // The token never shows in what the router serves.
    let (_, _, status) = call(&app, "GET", "/status", None, None).await;
    assert!(!status.contains(token));
    drop(app);
    shut(k).await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payment {
    id: u32,
    card_number: String,
    login: Login,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Login {
    user: String,
    password: String,
}

#[tokio::test]
async fn recent_messages_are_decoded_redacted_newest_first_and_behind_the_token() {
    let topic = unique_name("http-recent");
    let model = Model::builder()
        .topic::<Payment>(|t| {
            t.name(&topic)
                .partitions(2)
                .key(|p| p.id)
                .header("x-api-key", "k-123-never-shown")
                .header("region", "eu")
                .sensitive(["card_number"])
        })
        .build()
        .unwrap();
    let k = Arc::new(
        Kontext::builder(model)
            .broker(broker())
            .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(unique_name("http"))))
            .producer()
            .consumers(|c| {
                c.handler(|_p: Payment, _ctx: MessageContext| async { Ok(()) });
            })
            .start()
            .await
            .unwrap(),
    );
    let token = "another-s3cret-token";
    let read_only = router(&k, HttpSettings::read_only());
    let app = router(&k, HttpSettings::read_only().admin_token(token));
    let path = |q: &str| format!("/admin/messages?topic={topic}{q}");

    let sent = track([&*k])
        .timeout(Duration::from_secs(30))
        .run(|| async {
            let p = k.producer().unwrap();
            for id in 0..6 {
                let payment = Payment {
                    id,
                    card_number: "4111111111111111".into(),
                    login: Login {
                        user: format!("user-{id}"),
                        password: "hunter2".into(),
                    },
                };
                p.produce(&payment).await.unwrap();
            }
        })
        .await
        .unwrap();
    assert_eq!(sent.activity.of::<Payment>(&k).unwrap().handled, 6);

    let (code, _, _) = call(&read_only, "GET", &path(""), Some(token), None).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "admin off: no message view");
    let (code, _, _) = call(&app, "GET", &path(""), None, None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);

    // All six, each decoded, sensitive fields and headers redacted.
    let (code, body, text) = call(&app, "GET", &path("&limit=50"), Some(token), None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    for secret in ["4111111111111111", "hunter2", "k-123-never-shown"] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    let records = body["records"].as_array().unwrap();
    let mut ids: Vec<u64> = records
        .iter()
        .map(|r| r["value"]["id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3, 4, 5], "{body}");
    for r in records {
        assert_eq!(r["message_type"], json!("Payment"), "{r}");
        assert_eq!(r["value"]["card_number"], json!("<redacted>"), "{r}");
        assert_eq!(r["value"]["login"]["password"], json!("<redacted>"), "{r}");
        assert!(
            r["value"]["login"]["user"]
                .as_str()
                .unwrap()
                .starts_with("user-")
        );
        let header = |name: &str| {
            r["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h[0] == json!(name))
                .map(|h| h[1].clone())
        };
        assert_eq!(header("x-api-key"), Some(json!("<redacted>")), "{r}");
        assert_eq!(header("region"), Some(json!("eu")), "{r}");
        assert_eq!(header("ce_type"), Some(json!("Payment")), "{r}");
        assert_eq!(r["key"], json!(r["value"]["id"].to_string()), "{r}");
    }
    // Newest first.
    let times: Vec<i64> = records
        .iter()
        .map(|r| r["timestamp_ms"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let on_partition_one = records
        .iter()
        .filter(|r| r["partition"] == json!(1))
        .count();

    // A limit, and one partition.
    let (code, body, _) = call(&app, "GET", &path("&limit=2"), Some(token), None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["records"].as_array().unwrap().len(), 2, "{body}");
    let (code, body, _) = call(&app, "GET", &path("&partition=1"), Some(token), None).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let on_one = body["records"].as_array().unwrap();
    assert!(on_one.iter().all(|r| r["partition"] == json!(1)), "{body}");
    assert!(on_partition_one > 0, "six keys over two partitions: {body}");
    assert_eq!(on_one.len(), on_partition_one, "{body}");

    // Only the model's topics (and dead-letter topics) can be read.
    let (code, body, _) = call(
        &app,
        "GET",
        "/admin/messages?topic=__consumer_offsets",
        Some(token),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (code, _, _) = call(&app, "GET", "/admin/messages", Some(token), None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "a topic is required");

    // Lane rates appear once two status reads are a second apart.
    wait_until("a handled rate", async || {
        let (_, status, _) = call(&app, "GET", "/status", None, None).await;
        let rate = status["types"][0]["handled_per_s"].clone();
        ready(rate.is_number(), || rate.to_string())
    })
    .await;
    drop((app, read_only));
    shut(k).await;
}
