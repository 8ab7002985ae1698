//! TCC and XA scenarios (dtm test/tcc_test.go, tcc_cover_test.go, tcc_old_test.go,
//! xa_test.go) against the backend of `DTM_TEST_STORE`. The test plays the client: it
//! prepares, registers branches (calling the try itself) and submits or aborts.

use dtm_testkit::{Busi, TestServer, slot, with};
use serde_json::{Value, json};

type R = anyhow::Result<()>;

async fn setup() -> anyhow::Result<(TestServer, Busi)> {
    Ok((TestServer::start().await?, Busi::start().await?))
}

fn tcc(gid: &str) -> Value {
    json!({"gid": gid, "trans_type": "tcc"})
}

fn xa(gid: &str) -> Value {
    json!({"gid": gid, "trans_type": "xa"})
}

/// An XA branch whose commit and rollback go to `route`.
fn xa_branch(b: &Busi, gid: &str, id: &str, route: &str) -> Value {
    json!({"gid": gid, "branch_id": id, "trans_type": "xa", "url": b.route(route)})
}

async fn register(
    s: &TestServer,
    b: &Busi,
    gid: &str,
    id: &str,
    confirm: &str,
    cancel: &str,
) -> anyhow::Result<(u16, Value)> {
    s.post(
        "registerBranch",
        &json!({"gid": gid, "branch_id": id, "trans_type": "tcc", "confirm": b.route(confirm),
                "cancel": b.route(cancel), "data": json!({"amount": 30}).to_string()}),
    )
    .await
}

#[tokio::test]
async fn tcc_normal_confirms_in_reverse_registration_order() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    assert_eq!(s.post("prepare", &tcc(&gid)).await?.0, 200);
    assert_eq!(
        register(&s, &b, &gid, "01", "TransOutConfirm", "TransOutRevert")
            .await?
            .0,
        200
    );
    assert_eq!(
        register(&s, &b, &gid, "02", "TransInConfirm", "TransInRevert")
            .await?
            .0,
        200
    );
    assert_eq!(s.post("submit", &tcc(&gid)).await?.0, 200);
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "psps");
    assert_eq!(
        b.trace(&gid),
        ["TransInConfirm/confirm", "TransOutConfirm/confirm"]
    );
    let c = &b.calls_for(&gid)[0];
    assert_eq!((c.q("trans_type"), c.q("branch_id")), ("tcc", "02"));
    assert_eq!(c.body, json!({"amount": 30}).to_string());
    Ok(())
}

#[tokio::test]
async fn tcc_abort_cancels_and_retries_an_ongoing_cancel() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &tcc(&gid)).await?;
    register(&s, &b, &gid, "01", "TransOutConfirm", "TransOutRevert").await?;
    register(&s, &b, &gid, "02", "TransInConfirm", "TransInRevert").await?;
    b.set_once(slot::TRANS_OUT_REVERT, "ONGOING");
    let (code, _) = s
        .post(
            "abort",
            &with(tcc(&gid), json!({"rollback_reason": "try FAILURE"})),
        )
        .await?;
    assert_eq!(code, 200);
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "spsp");
    assert_eq!(
        b.trace(&gid),
        [
            "TransInRevert/cancel",
            "TransOutRevert/cancel",
            "TransOutRevert/cancel"
        ]
    );
    let (t, _) = s.query(&gid).await?;
    assert!(
        t["rollback_reason"]
            .as_str()
            .unwrap_or("")
            .contains("FAILURE"),
        "{t}"
    );
    Ok(())
}

#[tokio::test]
async fn tcc_timeout_cancels_and_refuses_late_registration() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &with(tcc(&gid), json!({"timeout_to_fail": 1})))
        .await?;
    register(&s, &b, &gid, "01", "TransOutConfirm", "TransOutRevert").await?;
    s.wait_status(&gid, "failed", 10).await?;
    let (code, v) = register(&s, &b, &gid, "02", "TransInConfirm", "TransInRevert").await?;
    assert_eq!(
        (code, v["dtm_result"].as_str()),
        (409, Some("FAILURE")),
        "{v}"
    );
    assert_eq!(s.branches(&gid).await?, "sp");
    let (t, _) = s.query(&gid).await?;
    assert_eq!(t["rollback_reason"], "Timeout after 1 seconds");
    assert_eq!(s.post("submit", &tcc(&gid)).await?.0, 409);
    Ok(())
}

#[tokio::test]
async fn tcc_registration_rules() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    // unknown transaction
    let (code, _) = register(&s, &b, &gid, "01", "TransOutConfirm", "TransOutRevert").await?;
    assert_eq!(code, 409);
    s.post("prepare", &tcc(&gid)).await?;
    assert_eq!(
        register(&s, &b, &gid, "01", "TransOutConfirm", "TransOutRevert")
            .await?
            .0,
        200
    );
    // a retried registration with the same content is accepted; other content is not
    assert_eq!(
        register(&s, &b, &gid, "01", "TransOutConfirm", "TransOutRevert")
            .await?
            .0,
        200
    );
    assert_eq!(
        register(&s, &b, &gid, "01", "TransInConfirm", "TransInRevert")
            .await?
            .0,
        409
    );
    // nested sub-branch ids work like any other
    assert_eq!(
        register(&s, &b, &gid, "0101", "TransInConfirm", "TransInRevert")
            .await?
            .0,
        200
    );
    // bad input
    let (code, v) = s
        .post(
            "registerBranch",
            &json!({"gid": gid, "branch_id": "02", "trans_type": "nope"}),
        )
        .await?;
    assert_eq!(code, 400, "{v}");
    let (code, v) = s
        .post(
            "registerBranch",
            &json!({"gid": gid, "branch_id": ["x"], "trans_type": "tcc"}),
        )
        .await?;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("branch_id"),
        "{v}"
    );
    // the legacy route works too
    assert_eq!(
        s.post(
            "registerTccBranch",
            &json!({"gid": gid, "branch_id": "03", "trans_type": "tcc",
            "confirm": b.route("TransInConfirm"), "cancel": b.route("TransInRevert")})
        )
        .await?
        .0,
        200
    );
    s.post("submit", &tcc(&gid)).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "pspsps");
    Ok(())
}

#[tokio::test]
async fn tcc_confirm_failure_is_retried_not_final() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &tcc(&gid)).await?;
    register(&s, &b, &gid, "01", "TransOutConfirm", "TransOutRevert").await?;
    b.set_once(slot::TRANS_OUT_CONFIRM, "FAILURE");
    let (code, _) = s
        .post("submit", &with(tcc(&gid), json!({"wait_result": true})))
        .await?;
    // with wait_result the confirm's FAILURE is reported (409); the confirm is retried
    assert_eq!(code, 409);
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(
        b.trace(&gid),
        ["TransOutConfirm/confirm", "TransOutConfirm/confirm"]
    );
    Ok(())
}

#[tokio::test]
async fn tcc_legacy_branch_answers() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &tcc(&gid)).await?;
    register(
        &s,
        &b,
        &gid,
        "01",
        "TransOutConfirmOld",
        "TransOutRevertOld",
    )
    .await?;
    b.set_once(slot::TRANS_OUT_CONFIRM, "ONGOING");
    s.post("submit", &tcc(&gid)).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(
        b.trace(&gid).len(),
        2,
        "200 {{dtm_result: ONGOING}} is retried"
    );
    Ok(())
}

#[tokio::test]
async fn tcc_headers_reach_confirms() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post(
        "prepare",
        &with(
            tcc(&gid),
            json!({"branch_headers": {"test_header": "test"}}),
        ),
    )
    .await?;
    register(&s, &b, &gid, "01", "TransOutHeaderYes", "TransOutHeaderYes").await?;
    s.post("submit", &tcc(&gid)).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ps");
    Ok(())
}

#[tokio::test]
async fn xa_commits_in_order_and_rolls_back() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &xa(&gid)).await?;
    assert_eq!(
        s.post("registerBranch", &xa_branch(&b, &gid, "01", "TransOut"))
            .await?
            .0,
        200
    );
    assert_eq!(
        s.post("registerBranch", &xa_branch(&b, &gid, "02", "TransIn"))
            .await?
            .0,
        200
    );
    s.post("submit", &xa(&gid)).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "psps");
    assert_eq!(b.trace(&gid), ["TransOut/commit", "TransIn/commit"]);
    // xa phase two is always a POST, even with an empty body
    assert!(b.calls_for(&gid).iter().all(|c| c.method == "POST"));

    let gid = s.new_gid().await?;
    s.post("prepare", &xa(&gid)).await?;
    s.post("registerBranch", &xa_branch(&b, &gid, "01", "TransOut"))
        .await?;
    s.post("abort", &xa(&gid)).await?;
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "sp");
    assert_eq!(b.trace(&gid), ["TransOut/rollback"]);
    Ok(())
}

#[tokio::test]
async fn xa_prepared_times_out_to_failed() -> R {
    let (s, _b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post(
        "prepare",
        &json!({"gid": gid, "trans_type": "xa", "timeout_to_fail": 1}),
    )
    .await?;
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.post("submit", &xa(&gid)).await?.0, 409);
    let (t, b) = s.query(&gid).await?;
    assert_eq!(t["rollback_reason"], "Timeout after 1 seconds");
    assert!(b.is_empty());
    Ok(())
}

#[tokio::test]
async fn tcc_confirm_failure_is_reported_to_the_webhook_and_metrics() -> R {
    let b = Busi::start().await?;
    let mut settings = dtm_testkit::fast_settings();
    settings.alert_webhook = b.route("AlertWebHook");
    let s = TestServer::start_with(settings).await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &tcc(&gid)).await?;
    register(&s, &b, &gid, "01", "TransOutConfirm", "TransOutRevert").await?;
    b.set_once(slot::TRANS_OUT_CONFIRM, "FAILURE");
    s.post("submit", &tcc(&gid)).await?;
    s.wait_status(&gid, "succeed", 10).await?;
    let hooks: Vec<_> = b
        .calls_for(&gid)
        .into_iter()
        .filter(|c| c.route == "AlertWebHook")
        .collect();
    assert_eq!(hooks.len(), 1, "{:?}", b.trace(&gid));
    let v: Value = serde_json::from_str(&hooks[0].body)?;
    assert!(
        v["branch"]
            .as_str()
            .unwrap_or("")
            .ends_with("/TransOutConfirm"),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap_or("").contains("FAILURE"), "{v}");
    let m = s.metrics().await?;
    assert!(m.contains("dtm_branch_unexpected_failure_total 1"), "{m}");
    Ok(())
}

/// dtm TestTccHeaders' shape: a branch registered with empty confirm and cancel URLs
/// finishes without any call from the server, on submit and on abort.
#[tokio::test]
async fn tcc_empty_confirm_and_cancel_urls_are_not_called() -> R {
    let (s, b) = setup().await?;
    let reg = |gid: &str| {
        json!({"gid": gid, "branch_id": "01", "trans_type": "tcc", "confirm": "",
               "cancel": "", "data": "{}"})
    };
    let gid = s.new_gid().await?;
    s.post("prepare", &tcc(&gid)).await?;
    let (code, body) = s.post("registerBranch", &reg(&gid)).await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["dtm_result"], "SUCCESS", "{body}");
    assert_eq!(s.post("submit", &tcc(&gid)).await?.0, 200);
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ps");

    let gid2 = s.new_gid().await?;
    s.post("prepare", &tcc(&gid2)).await?;
    s.post("registerBranch", &reg(&gid2)).await?;
    assert_eq!(s.post("abort", &tcc(&gid2)).await?.0, 200);
    s.wait_status(&gid2, "failed", 10).await?;
    assert_eq!(s.branches(&gid2).await?, "sp");
    assert!(b.calls_for(&gid).is_empty() && b.calls_for(&gid2).is_empty());
    Ok(())
}

/// dtm TestXaNotTimeout: a prepared XA inside its timeout is left alone by recovery; a
/// commit answered `200 {"dtm_result":"ONGOING"}` leaves it submitted, and the next
/// retry commits it.
#[tokio::test]
async fn xa_ongoing_commit_is_retried_and_a_live_prepare_is_left_alone() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post(
        "prepare",
        &json!({"gid": gid, "trans_type": "xa", "timeout_to_fail": 30}),
    )
    .await?;
    s.post("registerBranch", &xa_branch(&b, &gid, "01", "TransOut"))
        .await?;
    // several recovery passes (100 ms apart) and the global retry interval (1 s)
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(s.status(&gid).await?, "prepared");
    assert!(b.calls_for(&gid).is_empty());

    b.set_once(slot::NEXT, "ONGOING");
    assert_eq!(s.post("submit", &xa(&gid)).await?.0, 200);
    s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "ps");
    assert_eq!(b.trace(&gid), ["TransOut/commit", "TransOut/commit"]);
    Ok(())
}

/// dtm TestXaLocalError: an XA aborted before any branch registered ends failed.
#[tokio::test]
async fn xa_abort_without_branches_fails() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &xa(&gid)).await?;
    assert_eq!(s.post("abort", &xa(&gid)).await?.0, 200);
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(s.branches(&gid).await?, "");
    assert!(b.calls_for(&gid).is_empty());
    Ok(())
}

/// `abort` goes by the stored transaction type, whatever the request says: a tcc
/// aborted with `trans_type: saga` in the request is cancelled; a submitted saga cannot
/// be aborted (409 with the reason).
#[tokio::test]
async fn abort_goes_by_the_stored_trans_type() -> R {
    let (s, b) = setup().await?;
    let gid = s.new_gid().await?;
    s.post("prepare", &tcc(&gid)).await?;
    register(&s, &b, &gid, "01", "TransOutConfirm", "TransOutRevert").await?;
    let (code, v) = s
        .post("abort", &json!({"gid": gid, "trans_type": "saga"}))
        .await?;
    assert_eq!(code, 200, "{v}");
    s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(b.trace(&gid), ["TransOutRevert/cancel"]);

    let saga_gid = s.new_gid().await?;
    b.set_once(slot::TRANS_OUT, "ONGOING");
    s.post("submit", &dtm_testkit::transfer_saga(&saga_gid, &b))
        .await?;
    let (code, v) = s
        .post("abort", &json!({"gid": saga_gid, "trans_type": "tcc"}))
        .await?;
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["dtm_result"], "FAILURE", "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("cannot abort"),
        "{v}"
    );
    s.wait_status(&saga_gid, "succeed", 10).await?;
    Ok(())
}
