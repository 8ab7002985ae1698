//! JSON-RPC scenarios (dtm test/msg_jrpc_test.go, tcc_jrpc_test.go): the server driven
//! through `POST /api/json-rpc`, branches called over HTTP and JSON-RPC, against the
//! backend of `DTM_TEST_STORE`.

use std::time::{Duration, Instant};

use dtm_testkit::{Busi, TestServer, slot};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

async fn setup() -> anyhow::Result<(TestServer, Busi)> {
    Ok((TestServer::start().await?, Busi::start().await?))
}

fn code(v: &Value) -> i64 {
    v["error"]["code"].as_i64().unwrap_or(0)
}

async fn jrpc_gid(s: &TestServer) -> anyhow::Result<String> {
    let v = s.jrpc("newGid", &json!("")).await?;
    v["result"]["gid"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("newGid answered {v}"))
}

/// dtm's genJrpcMsg: TransOut over HTTP, TransIn over JSON-RPC.
fn jrpc_msg(gid: &str, b: &Busi) -> Value {
    json!({
        "gid": gid, "trans_type": "msg", "protocol": "json-rpc",
        "steps": [{"action": b.route("TransOut")}, {"action": b.jrpc_route("TransIn")}],
        "payloads": [json!({"amount": 30}).to_string(), json!({"amount": 30}).to_string()],
        "query_prepared": b.route("QueryPrepared"),
    })
}

async fn wait_calls(b: &Busi, gid: &str, route: &str, n: usize) -> R {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = b.calls_for(gid).iter().filter(|c| c.route == route).count();
        if got >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{route} called {got} times, expected {n}: {:?}",
            b.trace(gid)
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test]
async fn jrpc_new_gid() -> R {
    let (s, _) = setup().await?;
    let v = s.jrpc("newGid", &json!("")).await?;
    assert_eq!(v["jsonrpc"], "2.0");
    assert_eq!(v["id"], "no-use");
    assert!(v["error"].is_null(), "{v}");
    assert_eq!(v["result"]["gid"].as_str().map(str::len), Some(22), "{v}");
    // lenient: a numeric id is accepted and echoed as sent (dtm answers -32700)
    let v = s
        .jrpc_raw(r#"{"jsonrpc":"2.0","id":7,"method":"newGid"}"#)
        .await?;
    assert_eq!(
        (v["id"].as_i64(), v["error"].is_null()),
        (Some(7), true),
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn jrpc_error_codes() -> R {
    let (s, b) = setup().await?;
    // dtm TestMsgJprcAbnormal
    let v = s.jrpc_raw("hello").await?;
    assert_eq!(code(&v), -32700, "{v}");
    let v = s
        .jrpc_raw(r#"{"jsonrpc":"1.0","method":"newGid","params":"","id":"no-use"}"#)
        .await?;
    assert_eq!(code(&v), -32600, "{v}");
    let v = s
        .jrpc_raw(r#"{"jsonrpc":"2.0","method":"newGid","params":""}"#)
        .await?;
    assert_eq!(code(&v), -32600, "no id: {v}");
    let v = s.jrpc("not-exists", &json!("")).await?;
    assert_eq!(code(&v), -32601, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("newGid"),
        "{v}"
    );
    let v = s
        .jrpc("registerBranch", &json!({"trans_type": "not-exists"}))
        .await?;
    assert_eq!(code(&v), -32603, "{v}");
    assert!(v["result"].is_null(), "{v}");
    let v = s.jrpc("submit", &json!(["not", "an", "object"])).await?;
    assert_eq!(code(&v), -32603, "{v}");

    // FAILURE: -32901 (dtm TestMsgJrpcRepeated)
    let gid = jrpc_gid(&s).await?;
    let v = s.jrpc("submit", &jrpc_msg(&gid, &b)).await?;
    assert!(v["error"].is_null(), "{v}");
    s.wait_status(&gid, "succeed", 10).await?;
    let v = s.jrpc("submit", &jrpc_msg(&gid, &b)).await?;
    assert_eq!(code(&v), -32901, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("FAILURE"),
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn msg_jrpc_normal() -> R {
    let (s, b) = setup().await?;
    let gid = jrpc_gid(&s).await?;
    let v = s.jrpc("prepare", &jrpc_msg(&gid, &b)).await?;
    assert!(v["error"].is_null() && v["result"].is_null(), "{v}");
    assert_eq!(s.status(&gid).await?, "prepared");
    let v = s.jrpc("submit", &jrpc_msg(&gid, &b)).await?;
    assert!(v["error"].is_null(), "{v}");
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ss");
    assert_eq!(b.trace(&gid), ["TransOut/action", "TransIn/action"]);
    let (t, _) = s.query(&gid).await?;
    assert_eq!(t["protocol"], "json-rpc");
    // the JSON-RPC branch request (dtm §5.3): method from the URL, params = payload + ids
    let c = &b.calls_for(&gid)[1];
    let body: Value = serde_json::from_str(&c.body)?;
    assert_eq!(
        (body["jsonrpc"].as_str(), body["method"].as_str()),
        (Some("2.0"), Some("TransIn"))
    );
    assert!(body["id"].as_str().is_some_and(|s| !s.is_empty()), "{body}");
    assert_eq!(
        body["params"],
        json!({"amount": 30, "gid": gid, "trans_type": "msg", "branch_id": "02", "op": "action"})
    );
    Ok(())
}

#[tokio::test]
async fn msg_jrpc_back_check_over_json_rpc() -> R {
    // dtm cannot back-check through a JSON-RPC URL (its empty body fails to decode);
    // dtm-rs sends params with the ids only
    let (s, b) = setup().await?;
    let gid = jrpc_gid(&s).await?;
    let mut m = jrpc_msg(&gid, &b);
    m["query_prepared"] = json!(b.jrpc_route("QueryPrepared"));
    m["timeout_to_fail"] = json!(1);
    s.jrpc("prepare", &m).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    let qp = &b.calls_for(&gid)[0];
    assert_eq!(
        (qp.route.as_str(), qp.q("op"), qp.q("branch_id")),
        ("QueryPrepared", "msg", "00")
    );
    Ok(())
}

#[tokio::test]
async fn msg_jrpc_results_are_ongoing_until_success() -> R {
    // dtm TestMsgJrpcResults: dtm's busi answers every armed result with an error map whose
    // text contains ONGOING, so the message stays submitted until a clean answer
    let (s, b) = setup().await?;
    let gid = jrpc_gid(&s).await?;
    b.set_once(slot::JRPC, "OTHER");
    s.jrpc("submit", &jrpc_msg(&gid, &b)).await?;
    wait_calls(&b, &gid, "TransIn", 1).await?;
    b.set_once(slot::JRPC, "FAILURE");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.status(&gid).await?, "submitted");
    assert_eq!(s.branches(&gid).await?, "sp");
    wait_calls(&b, &gid, "TransIn", 2).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.status(&gid).await?, "submitted");
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ss");
    assert_eq!(
        b.calls_for(&gid)
            .iter()
            .filter(|c| c.route == "TransIn")
            .count(),
        3
    );
    Ok(())
}

#[tokio::test]
async fn saga_jrpc_error_codes_of_branches() -> R {
    // dtm never matches the numeric codes (its quirk Q2); dtm-rs reads -32901 as FAILURE
    // and any other error code as a retryable error
    let (s, b) = setup().await?;
    let saga = |gid: &str| {
        json!({"gid": gid, "trans_type": "saga", "protocol": "json-rpc",
            "steps": [{"action": b.jrpc_route("TransIn"), "compensate": b.jrpc_route("TransInRevert")}],
            "payloads": [json!({"amount": 30}).to_string()]})
    };
    let gid = jrpc_gid(&s).await?;
    b.set_once(slot::JRPC, "-32901");
    s.jrpc("submit", &saga(&gid)).await?;
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "sf");
    assert_eq!(
        b.trace(&gid),
        ["TransIn/action", "TransInRevert/compensate"]
    );

    let gid = jrpc_gid(&s).await?;
    b.set_once(slot::JRPC, "-32603");
    s.jrpc("submit", &saga(&gid)).await?;
    wait_calls(&b, &gid, "TransIn", 1).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.status(&gid).await?, "submitted");
    s.wait_status(&gid, "succeed", 15).await?;
    assert_eq!(b.trace(&gid), ["TransIn/action", "TransIn/action"]);
    Ok(())
}

#[tokio::test]
async fn tcc_jrpc_normal() -> R {
    // dtm TestTccJrpcNormal, plus a branch whose confirm/cancel are JSON-RPC URLs
    let (s, b) = setup().await?;
    let gid = jrpc_gid(&s).await?;
    let tcc = json!({"gid": gid, "trans_type": "tcc", "protocol": "json-rpc"});
    let v = s.jrpc("prepare", &tcc).await?;
    assert!(v["error"].is_null(), "{v}");
    let data = json!({"amount": 30}).to_string();
    let v = s
        .jrpc(
            "registerBranch",
            &json!({"gid": gid, "branch_id": "01", "trans_type": "tcc", "data": data,
                "confirm": b.route("TransOutConfirm"), "cancel": b.route("TransOutRevert")}),
        )
        .await?;
    assert!(v["error"].is_null(), "{v}");
    let v = s
        .jrpc(
            "registerBranch",
            &json!({"gid": gid, "branch_id": "02", "trans_type": "tcc", "data": data,
                "confirm": b.jrpc_route("TransInConfirm"), "cancel": b.jrpc_route("TransInRevert")}),
        )
        .await?;
    assert!(v["error"].is_null(), "{v}");
    let v = s.jrpc("submit", &tcc).await?;
    assert!(v["error"].is_null(), "{v}");
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "psps");
    assert_eq!(
        b.trace(&gid),
        ["TransInConfirm/confirm", "TransOutConfirm/confirm"]
    );
    let calls = b.calls_for(&gid);
    assert_eq!(calls[0].q("method"), "TransInConfirm");
    assert_eq!(calls[1].body, data);
    Ok(())
}

#[tokio::test]
async fn tcc_jrpc_abort() -> R {
    let (s, b) = setup().await?;
    let gid = jrpc_gid(&s).await?;
    let tcc = json!({"gid": gid, "trans_type": "tcc", "protocol": "json-rpc"});
    s.jrpc("prepare", &tcc).await?;
    s.jrpc(
        "registerBranch",
        &json!({"gid": gid, "branch_id": "01", "trans_type": "tcc", "data": "{}",
            "confirm": b.route("TransOutConfirm"), "cancel": b.route("TransOutRevert")}),
    )
    .await?;
    let mut abort = tcc.clone();
    abort["rollback_reason"] = json!("try failed");
    let v = s.jrpc("abort", &abort).await?;
    assert!(v["error"].is_null(), "{v}");
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "sp");
    // aborting a finished tcc is FAILURE
    let v = s.jrpc("abort", &abort).await?;
    assert_eq!(code(&v), -32901, "{v}");
    Ok(())
}

/// dtm TestMsgJrpcDoAndSubmitBusiFailed, the server's part: a prepared msg aborted
/// through JSON-RPC is failed and none of its branches runs.
#[tokio::test]
async fn msg_jrpc_abort_while_prepared() -> R {
    let (s, b) = setup().await?;
    let gid = jrpc_gid(&s).await?;
    s.jrpc("prepare", &jrpc_msg(&gid, &b)).await?;
    let v = s.jrpc("abort", &jrpc_msg(&gid, &b)).await?;
    assert!(v["error"].is_null(), "{v}");
    assert_eq!(s.status(&gid).await?, "failed");
    assert_eq!(s.branches(&gid).await?, "pp");
    // a submit afterwards is refused with FAILURE, and nothing is called
    let v = s.jrpc("submit", &jrpc_msg(&gid, &b)).await?;
    assert_eq!(code(&v), -32901, "{v}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(b.calls_for(&gid).is_empty(), "{:?}", b.trace(&gid));
    Ok(())
}
