//! Two-phase message scenarios (dtm test/msg_test.go, msg_options_test.go,
//! msg_delay_test.go, msg_webhook_test.go) against the backend of `DTM_TEST_STORE`.

use std::time::Duration;

use dtm_testkit::{Busi, TestServer, fast_settings, msg, slot, with};
use serde_json::json;

type R = anyhow::Result<()>;

async fn setup() -> anyhow::Result<(TestServer, Busi)> {
    Ok((TestServer::start().await?, Busi::start().await?))
}

async fn subscribe(s: &TestServer, topic: &str, url: &str) -> anyhow::Result<u16> {
    Ok(
        s.get(&format!("subscribe?topic={topic}&url={url}&remark=r"))
            .await?
            .0,
    )
}

#[tokio::test]
async fn msg_normal_through_a_topic() -> R {
    let (s, b) = setup().await?;
    assert_eq!(
        subscribe(&s, "http_trans", &b.route("TransOut")).await?,
        200
    );
    assert_eq!(subscribe(&s, "http_trans", &b.route("TransIn")).await?, 200);
    let gid = s.new_gid().await?;
    let body = json!({"gid": gid, "trans_type": "msg", "steps": [{"action": "topic://http_trans"}],
        "payloads": [json!({"amount": 30}).to_string()], "query_prepared": b.route("QueryPrepared")});
    let (code, _) = s.post("submit", &body).await?;
    assert_eq!(code, 200);
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ss");
    let (_, v) = s.get(&format!("query?gid={gid}")).await?;
    let ids: Vec<&str> = v["branches"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["branch_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["01-01", "01-02"]);
    assert_eq!(b.trace(&gid), ["TransOut/action", "TransIn/action"]);
    Ok(())
}

#[tokio::test]
async fn msg_topic_not_found_is_refused() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let body = json!({"gid": gid, "trans_type": "msg", "steps": [{"action": "topic://nobody"}],
        "payloads": ["{}"], "query_prepared": b.route("QueryPrepared")});
    let (code, v) = s.post("submit", &body).await?;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("topic not found"),
        "{v}"
    );
    assert!(s.query(&gid).await?.0.is_null(), "nothing stored");
    Ok(())
}

#[tokio::test]
async fn msg_prepare_is_idempotent_and_prepare_after_submit_fails() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let body = msg(&gid, &b, &["TransOut", "TransIn"]);
    assert_eq!(s.post("prepare", &body).await?.0, 200);
    assert_eq!(s.post("prepare", &body).await?.0, 200);
    assert_eq!(s.status(&gid).await?, "prepared");
    assert!(b.calls_for(&gid).is_empty(), "prepare calls nothing");
    assert_eq!(s.post("submit", &body).await?.0, 200);
    s.wait_status(&gid, "succeed", 10).await?;
    let (code, v) = s.post("prepare", &body).await?;
    assert_eq!((code, v["dtm_result"].as_str()), (409, Some("FAILURE")));
    Ok(())
}

#[tokio::test]
async fn msg_back_check_ongoing_then_success_runs_the_branches() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::QUERY_PREPARED, "ONGOING");
    let body = with(
        msg(&gid, &b, &["TransOut", "TransIn"]),
        json!({"timeout_to_fail": 1}),
    );
    s.post("prepare", &body).await?;
    s.wait_status(&gid, "succeed", 15).await?;
    assert_eq!(s.branches(&gid).await?, "ss");
    let calls = b.calls_for(&gid);
    let qp: Vec<_> = calls
        .iter()
        .filter(|c| c.route == "QueryPrepared")
        .collect();
    assert_eq!(qp.len(), 2, "ONGOING, then SUCCESS");
    // the back-check is a GET with branch_id 00 and op msg
    assert_eq!(qp[0].method, "GET");
    assert_eq!(
        (qp[0].q("trans_type"), qp[0].q("branch_id"), qp[0].q("op")),
        ("msg", "00", "msg")
    );
    assert_eq!(b.trace(&gid)[2..], ["TransOut/action", "TransIn/action"]);
    Ok(())
}

#[tokio::test]
async fn msg_back_check_failure_fails_the_message() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::QUERY_PREPARED, "FAILURE");
    let body = with(
        msg(&gid, &b, &["TransOut", "TransIn"]),
        json!({"timeout_to_fail": 1}),
    );
    s.post("prepare", &body).await?;
    s.wait_status(&gid, "failed", 15).await?;
    assert_eq!(s.branches(&gid).await?, "pp");
    assert_eq!(b.trace(&gid), ["QueryPrepared/msg"]);
    Ok(())
}

#[tokio::test]
async fn msg_not_timed_out_is_not_back_checked() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let body = with(
        msg(&gid, &b, &["TransOut"]),
        json!({"timeout_to_fail": 120}),
    );
    s.post("prepare", &body).await?;
    s.kick(&gid).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(s.status(&gid).await?, "prepared");
    assert!(b.calls_for(&gid).is_empty());
    Ok(())
}

/// dtm TestMsgOptionsTimeout: a msg prepared without `timeout_to_fail` is back-checked
/// only after the server's TimeoutToFail (3 s in these tests), then runs its branches.
#[tokio::test]
async fn msg_without_its_own_timeout_uses_the_global_one() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &msg(&gid, &b, &["TransOut"])).await?;
    s.kick(&gid).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.status(&gid).await?, "prepared");
    assert!(b.calls_for(&gid).is_empty(), "{:?}", b.trace(&gid));
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(
        b.trace(&gid),
        ["QueryPrepared/msg", "TransOut/action"],
        "back-check, then the branch"
    );
    Ok(())
}

/// dtm TestMsgNormal: right after a plain submit the message is `submitted` (its
/// branches run after the answer).
#[tokio::test]
async fn msg_is_submitted_right_after_submit() -> R {
    let (s, b) = setup().await?;
    b.set_delay(Duration::from_millis(500));
    let gid = s.new_gid().await?;
    let (code, v) = s
        .post("submit", &msg(&gid, &b, &["TransOut", "TransIn"]))
        .await?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(s.status(&gid).await?, "submitted");
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ss");
    Ok(())
}

#[tokio::test]
async fn msg_abort_while_prepared_fails_it() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let body = msg(&gid, &b, &["TransOut"]);
    s.post("prepare", &body).await?;
    let (code, _) = s.post("abort", &body).await?;
    assert_eq!(code, 200);
    assert_eq!(s.status(&gid).await?, "failed");
    assert_eq!(s.branches(&gid).await?, "p");
    assert_eq!(s.post("submit", &body).await?.0, 409);
    Ok(())
}

#[tokio::test]
async fn msg_branch_ongoing_and_failure_are_retried_until_success() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_IN, "ONGOING");
    s.post("submit", &msg(&gid, &b, &["TransOut", "TransIn"]))
        .await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(
        b.trace(&gid),
        ["TransOut/action", "TransIn/action", "TransIn/action"]
    );

    // a msg branch that answers FAILURE is retried too: msg branches never fail
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "FAILURE");
    s.post("submit", &msg(&gid, &b, &["TransOut", "TransIn"]))
        .await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ss");
    assert_eq!(
        b.trace(&gid),
        ["TransOut/action", "TransOut/action", "TransIn/action"]
    );
    Ok(())
}

#[tokio::test]
async fn msg_concurrent() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let body = with(
        msg(&gid, &b, &["TransOut", "TransIn"]),
        json!({"concurrent": true}),
    );
    s.post("submit", &body).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ss");
    Ok(())
}

#[tokio::test]
async fn msg_delay_counts_from_creation() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let body = with(
        msg(&gid, &b, &["TransOut", "TransIn"]),
        json!({"custom_data": "{\"delay\":2}"}),
    );
    s.post("submit", &body).await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(s.status(&gid).await?, "submitted");
    assert_eq!(s.branches(&gid).await?, "pp");
    assert!(b.calls_for(&gid).is_empty());
    s.wait_status(&gid, "succeed", 10).await?;
    Ok(())
}

#[tokio::test]
async fn msg_delay_given_at_submit_after_prepare_is_kept() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &msg(&gid, &b, &["TransOut"])).await?;
    let body = with(
        msg(&gid, &b, &["TransOut"]),
        json!({"custom_data": "{\"delay\":2}"}),
    );
    s.post("submit", &body).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(b.calls_for(&gid).is_empty(), "delayed");
    s.wait_status(&gid, "succeed", 10).await?;
    Ok(())
}

#[tokio::test]
async fn msg_alert_webhook_fires_when_a_branch_keeps_failing() -> R {
    webhook_scenario("").await
}

/// dtm TestMsgWebhookError: the webhook itself answers 500 (the simulator does so for a
/// gid with `Error` in it); that failure changes nothing for the message.
#[tokio::test]
async fn msg_alert_webhook_failure_is_ignored() -> R {
    webhook_scenario("Error").await
}

/// A msg whose TransIn keeps erring reaches the alert webhook, then succeeds once the
/// branch recovers. `suffix` is appended to the gid.
async fn webhook_scenario(suffix: &str) -> R {
    let b = Busi::start().await?;
    let mut settings = fast_settings();
    settings.alert_webhook = b.route("AlertWebHook");
    settings.alert_retry_limit = 1;
    let s = TestServer::start_with(settings).await?;
    let gid = format!("{}{suffix}", s.new_gid().await?);
    b.set_sticky("TransIn", "ERROR");
    s.post("submit", &msg(&gid, &b, &["TransOut", "TransIn"]))
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !b.calls_for(&gid).iter().any(|c| c.route == "AlertWebHook") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no webhook: {:?}",
            b.trace(&gid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hook = b
        .calls_for(&gid)
        .into_iter()
        .find(|c| c.route == "AlertWebHook");
    let v: serde_json::Value = serde_json::from_str(&hook.map(|c| c.body).unwrap_or_default())?;
    assert_eq!(v["gid"], gid.as_str());
    assert!(
        v["branch"].as_str().unwrap_or("").ends_with("/TransIn"),
        "{v}"
    );
    assert!(v["retry_count"].as_i64().unwrap_or(0) >= 1, "{v}");
    b.clear_sticky("TransIn");
    s.kick(&gid).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ss");
    Ok(())
}
