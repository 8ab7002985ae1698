//! SAGA scenarios (dtm test/saga_test.go, saga_concurrent_test.go, saga_options_test.go,
//! saga_compatible_test.go) over real HTTP against the backend of `DTM_TEST_STORE`.

use dtm_testkit::{Busi, TestServer, saga, slot, transfer_saga, with};
use serde_json::json;

type R = anyhow::Result<()>;

async fn setup() -> anyhow::Result<(TestServer, Busi)> {
    Ok((TestServer::start().await?, Busi::start().await?))
}

#[tokio::test]
async fn saga_normal() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let (code, v) = s.post("submit", &transfer_saga(&gid, &b)).await?;
    assert_eq!((code, v["dtm_result"].as_str()), (200, Some("SUCCESS")));
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "psps");
    assert_eq!(b.trace(&gid), ["TransOut/action", "TransIn/action"]);
    let (t, _) = s.query(&gid).await?;
    assert!(t.get("rollback_reason").is_none());
    // the branch call carries dtm's query parameters and the payload as a POST body
    let c = &b.calls_for(&gid)[0];
    assert_eq!(c.method, "POST");
    assert_eq!(
        (c.q("trans_type"), c.q("branch_id"), c.q("op")),
        ("saga", "01", "action")
    );
    assert_eq!(c.body, json!({"amount": 30}).to_string());
    Ok(())
}

#[tokio::test]
async fn saga_rollback_compensates_in_reverse_including_the_failed_step() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_IN, "FAILURE");
    b.set_once(slot::FAILURE_REASON, "Insufficient balance");
    s.post("submit", &transfer_saga(&gid, &b)).await?;
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "sssf");
    assert_eq!(
        b.trace(&gid),
        [
            "TransOut/action",
            "TransIn/action",
            "TransInRevert/compensate",
            "TransOutRevert/compensate"
        ]
    );
    let (t, _) = s.query(&gid).await?;
    assert!(
        t["rollback_reason"]
            .as_str()
            .unwrap_or("")
            .contains("Insufficient balance"),
        "{t}"
    );
    Ok(())
}

#[tokio::test]
async fn saga_ongoing_then_succeeds_on_retry() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "ONGOING");
    s.post("submit", &transfer_saga(&gid, &b)).await?;
    // first pass: TransOut ongoing, nothing else called
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(s.status(&gid).await?, "submitted");
    assert_eq!(s.branches(&gid).await?, "pppp");
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "psps");
    assert_eq!(
        b.trace(&gid),
        ["TransOut/action", "TransOut/action", "TransIn/action"]
    );
    Ok(())
}

#[tokio::test]
async fn saga_compensation_error_is_retried_until_failed() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_IN, "FAILURE");
    b.set_once(slot::TRANS_OUT_REVERT, "ERROR");
    s.post("submit", &transfer_saga(&gid, &b)).await?;
    s.wait_status(&gid, "aborting", 10).await?;
    s.wait_status(&gid, "failed", 15).await?;
    assert_eq!(s.branches(&gid).await?, "sssf");
    let t = b.trace(&gid);
    assert_eq!(
        t.iter()
            .filter(|x| *x == "TransOutRevert/compensate")
            .count(),
        2,
        "{t:?}"
    );
    assert_eq!(
        t.iter().filter(|x| *x == "TransIn/action").count(),
        1,
        "{t:?}"
    );
    Ok(())
}

#[tokio::test]
async fn saga_resubmit_is_idempotent_and_finished_saga_rejects_submit() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "ONGOING");
    let body = transfer_saga(&gid, &b);
    assert_eq!(s.post("submit", &body).await?.0, 200);
    assert_eq!(s.post("submit", &body).await?.0, 200);
    s.wait_status(&gid, "succeed", 10).await?;
    let (code, v) = s.post("submit", &body).await?;
    assert_eq!((code, v["dtm_result"].as_str()), (409, Some("FAILURE")));
    Ok(())
}

#[tokio::test]
async fn saga_reused_gid_with_other_steps_is_rejected() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("submit", &transfer_saga(&gid, &b)).await?;
    let other = saga(&gid, &b, &[("TransIn", "TransInRevert")], &json!({}));
    let (code, v) = s.post("submit", &other).await?;
    assert_eq!(code, 409, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("different steps"),
        "{v}"
    );
    Ok(())
}

#[tokio::test]
async fn saga_empty_urls_succeed_without_calls() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let body = saga(&gid, &b, &[("TransOut", ""), ("", "")], &json!({}));
    s.post("submit", &body).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "psps");
    assert_eq!(b.trace(&gid), ["TransOut/action"]);
    Ok(())
}

#[tokio::test]
async fn saga_concurrent_normal() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let body = with(
        transfer_saga(&gid, &b),
        json!({"custom_data": r#"{"concurrent":true}"#}),
    );
    s.post("submit", &body).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "psps");
    Ok(())
}

#[tokio::test]
async fn saga_concurrent_rollback_order_respects_dependencies() -> R {
    let (s, b) = setup().await?;
    // step 1 waits for step 0; step 0 fails, so step 1 never starts and is not compensated
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "FAILURE");
    let body = with(
        transfer_saga(&gid, &b),
        json!({"custom_data": r#"{"concurrent":true,"orders":{"1":[0]}}"#}),
    );
    s.post("submit", &body).await?;
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "sfpp");
    assert_eq!(
        b.trace(&gid),
        ["TransOut/action", "TransOutRevert/compensate"]
    );

    // step 1 fails after step 0 succeeded: compensate 1 before 0
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_IN, "FAILURE");
    let body = with(
        transfer_saga(&gid, &b),
        json!({"custom_data": r#"{"concurrent":true,"orders":{"1":[0]}}"#}),
    );
    s.post("submit", &body).await?;
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "sssf");
    assert_eq!(
        b.trace(&gid),
        [
            "TransOut/action",
            "TransIn/action",
            "TransInRevert/compensate",
            "TransOutRevert/compensate"
        ]
    );
    Ok(())
}

/// dtm TestSagaConRollbackNormal: a concurrent saga without orders whose first action
/// fails and whose first compensation answers ONGOING once: `aborting` until that
/// compensation is retried, then `failed`, every started action compensated.
#[tokio::test]
async fn saga_concurrent_rollback_with_an_ongoing_compensation() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "FAILURE");
    b.set_once(slot::TRANS_OUT_REVERT, "ONGOING");
    let body = with(
        transfer_saga(&gid, &b),
        json!({"custom_data": r#"{"concurrent":true}"#}),
    );
    assert_eq!(s.post("submit", &body).await?.0, 200);
    s.wait_status(&gid, "aborting", 5).await?;
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "sfss");
    let mut trace = b.trace(&gid);
    // the two actions run at once, so their order is not fixed; compensations follow
    trace[..2].sort();
    assert_eq!(&trace[..2], ["TransIn/action", "TransOut/action"]);
    let mut comp = trace[2..].to_vec();
    comp.sort();
    assert_eq!(
        comp,
        [
            "TransInRevert/compensate",
            "TransOutRevert/compensate",
            "TransOutRevert/compensate"
        ]
    );
    let (t, _) = s.query(&gid).await?;
    assert!(
        t["rollback_reason"]
            .as_str()
            .is_some_and(|r| r.contains("TransOut") && r.ends_with("FAILURE")),
        "{t}"
    );
    Ok(())
}

#[tokio::test]
async fn saga_concurrent_committed_ongoing() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "ONGOING");
    let body = with(
        transfer_saga(&gid, &b),
        json!({"custom_data": r#"{"concurrent":true}"#}),
    );
    s.post("submit", &body).await?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(s.branches(&gid).await?, "ppps");
    assert_eq!(s.status(&gid).await?, "submitted");
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "psps");
    Ok(())
}

#[tokio::test]
async fn saga_legacy_step_data_payload() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    let body = json!({"gid": gid, "trans_type": "saga", "steps": [
        {"action": b.route("TransOut"), "compensate": b.route("TransOutRevert"), "data": "{\"amount\":30}"},
        {"action": b.route("TransIn"), "compensate": b.route("TransInRevert"), "data": "{\"amount\":30}"},
    ]});
    s.post("submit", &body).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "psps");
    assert_eq!(b.calls_for(&gid)[1].body, "{\"amount\":30}");
    Ok(())
}

#[tokio::test]
async fn saga_retry_interval_is_honoured_after_an_error() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "ERROR");
    let body = with(
        saga(&gid, &b, &[("TransOut", "TransOutRevert")], &json!({})),
        json!({"retry_interval": 150}),
    );
    s.post("submit", &body).await?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (t, _) = s.query(&gid).await?;
    assert_eq!(t["status"], "submitted");
    assert_eq!(s.branches(&gid).await?, "pp");
    // backoff doubled the interval
    assert_eq!(t["next_cron_interval"], 300, "{t}");
    // recovery does not retry before it is due; an operator can make it due now
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(b.trace(&gid).len(), 1);
    s.kick(&gid).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ps");
    Ok(())
}

#[tokio::test]
async fn saga_timeout_compensates_the_in_flight_step() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_sticky("TransOut", "ONGOING");
    let body = with(transfer_saga(&gid, &b), json!({"timeout_to_fail": 1}));
    s.post("submit", &body).await?;
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "sppp");
    let (t, _) = s.query(&gid).await?;
    assert_eq!(t["rollback_reason"], "Timeout after 1 seconds");
    assert!(!b.trace(&gid).contains(&"TransIn/action".to_string()));
    Ok(())
}

#[tokio::test]
async fn saga_wait_result_answers_the_outcome() -> R {
    let (s, b) = setup().await?;
    // success: final statuses are there when submit returns
    let gid = s.new_gid().await?;
    let (code, _) = s
        .post(
            "submit",
            &with(transfer_saga(&gid, &b), json!({"wait_result": true})),
        )
        .await?;
    assert_eq!(code, 200);
    assert_eq!(s.status(&gid).await?, "succeed");
    assert_eq!(s.branches(&gid).await?, "psps");

    // rollback: 409 with the reason
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_IN, "FAILURE");
    b.set_once(slot::FAILURE_REASON, "Insufficient balance");
    let (code, v) = s
        .post(
            "submit",
            &with(transfer_saga(&gid, &b), json!({"wait_result": true})),
        )
        .await?;
    assert_eq!(code, 409, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("Insufficient balance"),
        "{v}"
    );
    assert_eq!(s.status(&gid).await?, "failed");
    assert_eq!(s.branches(&gid).await?, "sssf");
    // dtm's texts: `url:<url> return failed: <answer> FAILURE`, FAILURE once; the 409
    // carries the same text
    let (t, _) = s.query(&gid).await?;
    let reason = t["rollback_reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("url:")
            && reason.contains(" return failed: ")
            && reason.ends_with(" FAILURE")
            && !reason.ends_with("FAILURE FAILURE"),
        "{reason}"
    );
    assert_eq!(v["message"], reason, "{v}");

    // ongoing: an error, the saga stays submitted and later succeeds
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "ONGOING");
    let (code, _) = s
        .post(
            "submit",
            &with(transfer_saga(&gid, &b), json!({"wait_result": true})),
        )
        .await?;
    assert_ne!(code, 200);
    assert_eq!(s.branches(&gid).await?, "pppp");
    s.wait_status(&gid, "succeed", 10).await?;
    Ok(())
}

#[tokio::test]
async fn saga_branch_headers_reach_branches_on_every_call() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "ONGOING");
    let body = with(
        saga(&gid, &b, &[("TransOutHeaderYes", "")], &json!({})),
        json!({"branch_headers": {"test_header": "test"}}),
    );
    s.post("submit", &body).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    let calls = b.calls_for(&gid);
    assert_eq!(calls.len(), 2);
    assert!(
        calls
            .iter()
            .all(|c| c.headers.get("test_header").map(String::as_str) == Some("test"))
    );
    Ok(())
}

#[tokio::test]
async fn saga_retry_limit() -> R {
    let (s, b) = setup().await?;
    // TransInRetry fails 3 times, then succeeds: retry_limit 3 is enough
    let gid = s.new_gid().await?;
    let body = with(
        saga(
            &gid,
            &b,
            &[
                ("TransOut", "TransOutRevert"),
                ("TransInRetry", "TransInRevert"),
            ],
            &json!({}),
        ),
        json!({"retry_limit": 3, "wait_result": true}),
    );
    let (code, v) = s.post("submit", &body).await?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(s.branches(&gid).await?, "psps");

    // retry_limit 1 is not: the saga rolls back
    let gid = s.new_gid().await?;
    let body = with(
        saga(
            &gid,
            &b,
            &[
                ("TransOut", "TransOutRevert"),
                ("TransInRetry", "TransInRevert"),
            ],
            &json!({}),
        ),
        json!({"retry_limit": 1, "wait_result": true}),
    );
    let (code, _) = s.post("submit", &body).await?;
    assert_eq!(code, 409);
    assert_eq!(s.status(&gid).await?, "failed");
    assert_eq!(s.branches(&gid).await?, "sssp");
    let (t, _) = s.query(&gid).await?;
    assert_eq!(
        t["rollback_reason"],
        "RetryCount is greater than RetryLimit, RetryLimit: 1"
    );
    Ok(())
}

/// ONGOING counts toward `retry_limit` as errors do (as in dtm): an action that keeps
/// answering ONGOING is retried at once `retry_limit` times, then the saga rolls back,
/// compensating it.
#[tokio::test]
async fn saga_retry_limit_counts_ongoing() -> R {
    let (s, b) = setup().await?;
    b.set_sticky("TransOut", "ONGOING");
    let gid = s.new_gid().await?;
    let body = with(
        transfer_saga(&gid, &b),
        json!({"retry_limit": 1, "wait_result": true}),
    );
    let (code, v) = s.post("submit", &body).await?;
    assert_eq!(code, 409, "{v}");
    assert_eq!(s.status(&gid).await?, "failed");
    assert_eq!(s.branches(&gid).await?, "sppp");
    assert_eq!(
        b.trace(&gid),
        [
            "TransOut/action",
            "TransOut/action",
            "TransOutRevert/compensate"
        ]
    );
    let (t, _) = s.query(&gid).await?;
    assert_eq!(
        t["rollback_reason"],
        "RetryCount is greater than RetryLimit, RetryLimit: 1"
    );
    b.clear_sticky("TransOut");
    Ok(())
}

#[tokio::test]
async fn saga_request_timeout_per_transaction() -> R {
    let mut settings = dtm_testkit::fast_settings();
    settings.request_timeout = 1;
    let s = TestServer::start_with(settings).await?;
    let b = Busi::start().await?;
    b.set_delay(std::time::Duration::from_millis(1500));
    // the global 1 s timeout cuts the slow branch off: the saga stays submitted
    let gid = s.new_gid().await?;
    let body = with(
        saga(&gid, &b, &[("TransOut", "")], &json!({})),
        json!({"wait_result": true}),
    );
    let (code, _) = s.post("submit", &body).await?;
    assert_ne!(code, 200);
    assert_eq!(s.status(&gid).await?, "submitted");
    s.post("forceStop", &json!({"gid": gid})).await?;
    // the transaction's own request_timeout of 3 s lets it finish
    let gid = s.new_gid().await?;
    let body = with(
        saga(&gid, &b, &[("TransOut", "")], &json!({})),
        json!({"wait_result": true, "request_timeout": 3}),
    );
    let (code, v) = s.post("submit", &body).await?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(s.branches(&gid).await?, "ps");
    Ok(())
}
