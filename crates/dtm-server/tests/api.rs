//! API behaviour (dtm test/api_test.go, topic_test.go) and bad input, against the backend
//! of `DTM_TEST_STORE`.

use std::time::Duration;

use dtm_testkit::{Busi, TestServer, msg, slot, transfer_saga};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

#[tokio::test]
async fn version_ping_newgid() -> R {
    let s = TestServer::start().await?;
    let (code, v) = s.get("version").await?;
    assert_eq!(code, 200);
    assert!(v["version"].as_str().unwrap_or("").starts_with('v'));
    let r = s.http.get(s.api.replace("/dtmsvr", "/ping")).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await?, r#"{"msg":"pong"}"#);
    let (code, v) = s.get("newGid").await?;
    assert_eq!((code, v["dtm_result"].as_str()), (200, Some("SUCCESS")));
    assert_eq!(v["gid"].as_str().map(str::len), Some(22));
    assert!(s.metrics().await?.contains("dtm_server_process_total"));
    // requests to paths no route takes all count as `other`: the label set stays bounded
    for i in 0..5 {
        assert_eq!(s.get(&format!("nosuch{i}?x={i}")).await?.0, 404);
    }
    let text = s.metrics().await?;
    let labels: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("dtm_server_process_total{"))
        .collect();
    assert!(labels.iter().all(|l| !l.contains("nosuch")), "{labels:?}");
    assert!(
        labels.iter().any(|l| l.contains("api=\"other\"")
            && l.contains("status=\"fail\"")
            && l.ends_with(" 5")),
        "{labels:?}"
    );
    assert!(
        labels.iter().any(|l| l.contains("api=\"newgid\"")),
        "{labels:?}"
    );
    Ok(())
}

#[tokio::test]
async fn query_known_unknown_and_missing_gid() -> R {
    let (s, b) = (TestServer::start().await?, Busi::start().await?);
    let gid = s.new_gid().await?;
    s.post("submit", &msg(&gid, &b, &["TransOut", "TransIn"]))
        .await?;
    s.wait_status(&gid, "succeed", 10).await?;
    let (code, v) = s.get(&format!("query?gid={gid}")).await?;
    assert_eq!(code, 200);
    assert_eq!(v["transaction"]["gid"], gid.as_str());
    assert_eq!(v["transaction"]["trans_type"], "msg");
    assert_eq!(v["branches"].as_array().map(Vec::len), Some(2));
    let (code, v) = s.get("query?gid=nobody-has-this").await?;
    assert_eq!(code, 200);
    assert!(v["transaction"].is_null());
    assert_eq!(v["branches"], json!([]));
    for missing in ["query", "query?gid="] {
        let (code, v) = s.get(missing).await?;
        assert_eq!(code, 400, "{missing}: {v}");
        assert!(v["message"].as_str().unwrap_or("").contains("gid"), "{v}");
    }
    Ok(())
}

#[tokio::test]
async fn all_pages_and_filters() -> R {
    let (s, b) = (TestServer::start().await?, Busi::start().await?);
    let mut gids = vec![];
    for _ in 0..3 {
        let gid = s.new_gid().await?;
        s.post("submit", &msg(&gid, &b, &["TransOut"])).await?;
        gids.push(gid);
    }
    for g in &gids {
        s.wait_status(g, "succeed", 10).await?;
    }
    let (_, p1) = s.get("all?limit=1").await?;
    let pos1 = p1["next_position"].as_str().unwrap_or("").to_string();
    assert!(!pos1.is_empty(), "{p1}");
    assert_eq!(p1["transactions"].as_array().map(Vec::len), Some(1));
    let (_, p2) = s.get(&format!("all?limit=1&position={pos1}")).await?;
    let pos2 = p2["next_position"].as_str().unwrap_or("").to_string();
    assert_ne!(pos1, pos2);
    assert_ne!(p1["transactions"][0]["gid"], p2["transactions"][0]["gid"]);
    let (_, rest) = s.get(&format!("all?limit=1000&position={pos2}")).await?;
    assert_eq!(rest["next_position"], "");
    assert_eq!(rest["transactions"].as_array().map(Vec::len), Some(1));
    let (_, one) = s.get(&format!("all?gid={}", gids[0])).await?;
    assert_eq!(one["transactions"].as_array().map(Vec::len), Some(1));
    let now_ms = chrono::Utc::now().timestamp_millis();
    let (_, f) = s
        .get(&format!(
            "all?status=succeed&transType=msg&createTimeStart={}&createTimeEnd={}",
            now_ms - 60_000,
            now_ms + 60_000
        ))
        .await?;
    let list = f["transactions"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 3);
    assert!(
        list.iter()
            .all(|t| t["status"] == "succeed" && t["trans_type"] == "msg")
    );
    assert_eq!(f["next_position"], "");
    let (_, old) = s
        .get(&format!(
            "all?createTimeStart={}&createTimeEnd={}",
            now_ms - 600_000,
            now_ms - 300_000
        ))
        .await?;
    assert!(old["transactions"].is_null(), "{old}");
    let (code, _) = s.get("all?limit=abc").await?;
    assert_eq!(code, 400);
    let (code, _) = s.get("all?status=bogus").await?;
    assert_eq!(code, 400);
    Ok(())
}

#[tokio::test]
async fn force_stop() -> R {
    let (s, b) = (TestServer::start().await?, Busi::start().await?);
    let gid = s.new_gid().await?;
    b.set_sticky("TransOut", "ONGOING");
    s.post("submit", &transfer_saga(&gid, &b)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.status(&gid).await?, "submitted");
    let (code, _) = s.post("forceStop", &json!({"gid": gid})).await?;
    assert_eq!(code, 200);
    assert_eq!(s.status(&gid).await?, "failed");
    let calls = b.calls_for(&gid).len();
    b.clear_sticky("TransOut");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        s.status(&gid).await?,
        "failed",
        "a stopped transaction stays stopped"
    );
    assert!(
        b.calls_for(&gid).len() <= calls + 1,
        "no processing after forceStop"
    );
    let (code, v) = s.post("forceStop", &json!({"gid": gid})).await?;
    assert_eq!((code, v["dtm_result"].as_str()), (409, Some("FAILURE")));
    let (code, _) = s.post("forceStop", &json!({"gid": "nobody"})).await?;
    assert_eq!(code, 404);
    Ok(())
}

#[tokio::test]
async fn reset_next_cron_time_and_reset_cron_time() -> R {
    let (s, b) = (TestServer::start().await?, Busi::start().await?);
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "ERROR");
    s.post(
        "submit",
        &serde_json::json!({"gid": gid, "trans_type": "saga", "retry_interval": 600,
        "steps": [{"action": b.route("TransOut"), "compensate": ""}], "payloads": ["{}"]}),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t, _) = s.query(&gid).await?;
    let next = chrono::DateTime::parse_from_rfc3339(t["next_cron_time"].as_str().unwrap_or(""))?;
    assert!(
        next > chrono::Utc::now() + chrono::Duration::seconds(600),
        "{t}"
    );
    // bulk reset brings it back
    let (code, v) = s.get("resetCronTime?timeout=60&limit=10").await?;
    assert_eq!(code, 200);
    assert_eq!(v["succeed_count"], 1, "{v}");
    assert_eq!(v["has_remaining"], false);
    s.wait_status(&gid, "succeed", 10).await?;
    let (code, _) = s.post("resetNextCronTime", &json!({"gid": gid})).await?;
    assert_eq!(code, 200);
    let (t, _) = s.query(&gid).await?;
    let next = chrono::DateTime::parse_from_rfc3339(t["next_cron_time"].as_str().unwrap_or(""))?;
    assert!(next < chrono::Utc::now() + chrono::Duration::seconds(3));
    assert_eq!(
        s.post("resetNextCronTime", &json!({"gid": "nobody"}))
            .await?
            .0,
        404
    );
    Ok(())
}

/// Options may carry any int64, as dtm's do. The largest ones are held to 2^31−1 seconds
/// instead of overflowing a date: the request is answered, the transaction is stored and
/// can still be driven by hand.
#[tokio::test]
async fn extreme_intervals_are_capped_not_a_crash() -> R {
    let (s, b) = (TestServer::start().await?, Busi::start().await?);
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "ERROR");
    let (code, v) = s
        .post(
            "submit",
            &json!({"gid": gid, "trans_type": "saga", "retry_interval": i64::MAX,
            "timeout_to_fail": i64::MAX, "request_timeout": i64::MAX,
            "steps": [{"action": b.route("TransOut"), "compensate": ""}], "payloads": ["{}"]}),
        )
        .await?;
    assert_eq!(code, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t, _) = s.query(&gid).await?;
    assert_eq!(t["status"], "submitted", "{t}");
    let next = chrono::DateTime::parse_from_rfc3339(t["next_cron_time"].as_str().unwrap_or(""))?;
    // the retry after the failed call: 68 years, plus up to a tenth of it as jitter
    let years = (next.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_days() / 365;
    assert!((67..=75).contains(&years), "{t}");
    assert_eq!(t["next_cron_interval"], i32::MAX, "{t}");
    let (code, v) = s
        .get(&format!("resetCronTime?timeout={}&limit=10", i64::MAX))
        .await?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        s.post("resetNextCronTime", &json!({"gid": gid})).await?.0,
        200
    );
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.get("version").await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn topics_subscribe_unsubscribe_delete_and_kv() -> R {
    let s = TestServer::start().await?;
    let sub = |t: &str, u: &str| format!("subscribe?topic={t}&url={u}&remark=r");
    let unsub = |t: &str, u: &str| format!("unsubscribe?topic={t}&url={u}");
    let u1 = "http://127.0.0.1:1/a";
    let u2 = "http://127.0.0.1:1/b";
    assert_eq!(s.get(&sub("t1", u1)).await?.0, 200);
    assert_ne!(s.get(&sub("t1", u1)).await?.0, 200, "same url twice");
    assert_eq!(s.get(&sub("", u1)).await?.0, 400);
    assert_eq!(s.get(&sub("t1", "")).await?.0, 400);
    assert_eq!(s.get(&sub("t1", u2)).await?.0, 200);
    let (_, kv) = s.get("queryKV?cat=topics&key=t1").await?;
    assert_eq!(kv["kv"][0]["version"], 2);
    let subs: Value = serde_json::from_str(kv["kv"][0]["v"].as_str().unwrap_or("[]"))?;
    assert_eq!(subs.as_array().map(Vec::len), Some(2));
    assert_eq!(
        s.get("queryKV?cat=topics&key=none").await?.1["kv"],
        json!([])
    );
    assert_eq!(s.get(&unsub("t1", u1)).await?.0, 200);
    assert_ne!(s.get(&unsub("t1", u1)).await?.0, 200);
    assert_eq!(s.get(&unsub("", u1)).await?.0, 400);
    assert_ne!(s.get(&unsub("nope", u1)).await?.0, 200);
    assert_eq!(s.get(&unsub("t1", u2)).await?.0, 200);
    assert_ne!(s.get(&unsub("t1", u2)).await?.0, 200, "this topic is empty");
    for t in ["t2", "t3", "t4"] {
        s.get(&sub(t, u1)).await?;
    }
    let (_, p) = s.get("scanKV?cat=topics&limit=1").await?;
    let pos = p["next_position"].as_str().unwrap_or("").to_string();
    assert!(!pos.is_empty());
    // the next page of one has another token and another key
    let (_, p1) = s
        .get(&format!("scanKV?cat=topics&limit=1&position={pos}"))
        .await?;
    let pos1 = p1["next_position"].as_str().unwrap_or("").to_string();
    assert!(!pos1.is_empty() && pos1 != pos, "{pos} then {pos1}");
    let (_, p2) = s
        .get(&format!("scanKV?cat=topics&limit=100&position={pos1}"))
        .await?;
    assert_eq!(p2["next_position"], "");
    let mut keys: Vec<String> = [&p, &p1, &p2]
        .iter()
        .flat_map(|page| page["kv"].as_array().cloned().unwrap_or_default())
        .filter_map(|kv| kv["k"].as_str().map(str::to_string))
        .collect();
    keys.sort();
    assert_eq!(keys, ["t1", "t2", "t3", "t4"], "every topic once");
    let r = s
        .http
        .delete(format!("{}/topic/nope", s.api))
        .send()
        .await?;
    assert_ne!(r.status().as_u16(), 200);
    let r = s.http.delete(format!("{}/topic/t1", s.api)).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    Ok(())
}

#[tokio::test]
async fn concurrent_subscribes_keep_versions_consistent() -> R {
    let s = std::sync::Arc::new(TestServer::start().await?);
    let mut tasks = vec![];
    for i in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.get(&format!("subscribe?topic=ct&url=http://127.0.0.1:1/u{i}"))
                .await
                .map(|r| (i, r.0))
        }));
    }
    let mut winners = vec![];
    for t in tasks {
        let (i, code) = t.await??;
        if code == 200 {
            winners.push(i);
        }
    }
    assert!(!winners.is_empty());
    for i in &winners {
        let (code, v) = s
            .get(&format!("unsubscribe?topic=ct&url=http://127.0.0.1:1/u{i}"))
            .await?;
        assert_eq!(code, 200, "{v}");
    }
    let (_, kv) = s.get("queryKV?cat=topics&key=ct").await?;
    assert_eq!(kv["kv"][0]["version"], json!(2 * winners.len()));
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_nothing_is_stored() -> R {
    let s = TestServer::start().await?;
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("submit", "{bad json".into(), 400, "not valid JSON"),
        ("submit", "".into(), 400, "empty"),
        ("submit", "[1,2]".into(), 400, "object"),
        ("submit", json!({"trans_type": "saga", "steps": [{"action": "http://x/a"}]}).to_string(), 400, "gid"),
        ("submit", json!({"gid": "b1", "trans_type": "bogus"}).to_string(), 400, "trans_type"),
        ("submit", json!({"gid": "b2"}).to_string(), 400, "trans_type"),
        ("submit", json!({"gid": "b3", "trans_type": "saga", "steps": []}).to_string(), 400, "step"),
        ("submit", json!({"gid": "b4", "trans_type": "msg"}).to_string(), 400, "step"),
        ("submit", json!({"gid": "b5", "trans_type": "saga", "steps": "x"}).to_string(), 400, "steps"),
        ("submit", json!({"gid": "b6", "trans_type": "saga", "steps": [{"action": "ftp://x"}], "payloads": [""]}).to_string(), 400, "URL"),
        ("submit", json!({"gid": "b7", "trans_type": "saga", "steps": [{"action": "http://x/a"}], "timeout_to_fail": "soon"}).to_string(), 400, "timeout_to_fail"),
        ("submit", json!({"gid": "b8", "trans_type": "saga", "steps": [{"action": "http://x/a"}], "custom_data": "{\"orders\":{\"0\":[0]}}"}).to_string(), 400, "orders"),
        ("submit", json!({"gid": "b9", "trans_type": "saga", "steps": [{"action": "http://x/a"}], "payloads": ["a", "b"]}).to_string(), 400, "payload"),
        ("submit", json!({"gid": "b10", "trans_type": "saga", "steps": [{"action": "http://x/a"}], "timeout_to_fail": -1}).to_string(), 400, "negative"),
        ("submit", json!({"gid": "b11", "trans_type": "saga", "steps": [{"action": "http://x/a"}], "branch_headers": {"bad name": "v"}}).to_string(), 400, "not a valid header name"),
        ("submit", json!({"gid": "b12", "trans_type": "saga", "steps": [{"action": "http://x/a"}], "branch_headers": {"x-a": "v\r\nx-b: 1"}}).to_string(), 400, "control characters"),
        ("prepare", json!({"gid": "b13", "trans_type": "tcc", "branch_headers": {"": "v"}}).to_string(), 400, "header name"),
        ("prepare", json!({"gid": "", "trans_type": "tcc"}).to_string(), 400, "gid"),
        ("abort", json!({"gid": "nobody", "trans_type": "tcc"}).to_string(), 404, "nobody"),
        ("registerBranch", json!({"gid": "x", "branch_id": "01", "trans_type": "tcc", "confirm": 5, "data": {"a": 1}}).to_string(), 400, "data"),
        ("registerBranch", json!({"branch_id": "01", "trans_type": "tcc"}).to_string(), 400, "gid"),
        ("forceStop", "{}".into(), 400, "gid"),
    ];
    for (path, body, want, needle) in cases {
        let (code, v) = s.post_raw(path, &body).await?;
        assert_eq!(code, want, "{path} {body} -> {v}");
        let m = v["message"].as_str().unwrap_or("");
        assert!(
            m.contains(needle),
            "{path} {body}: message '{m}' should mention '{needle}'"
        );
    }
    for g in [
        "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9", "b10", "b11", "b12", "b13",
    ] {
        assert!(s.query(g).await?.0.is_null(), "{g} must not be stored");
    }
    // oversize body
    let big = format!(
        "{{\"gid\":\"big\",\"trans_type\":\"saga\",\"pad\":\"{}\"}}",
        "x".repeat(2 << 20)
    );
    let (code, _) = s.post_raw("submit", &big).await?;
    assert_eq!(code, 413);
    // unknown route, wrong method
    assert_eq!(s.get("nope").await?.0, 404);
    let (code, body) = s.get("submit").await?;
    assert_eq!(code, 405);
    assert_eq!(
        body["message"].as_str().unwrap_or(""),
        "GET is not allowed on /api/dtmsvr/submit: send it with one of the methods in the Allow header",
        "{body}"
    );
    // still serving
    assert_eq!(s.get("version").await?.0, 200);
    Ok(())
}
