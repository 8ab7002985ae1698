//! Workflow server side (dtm test/workflow_*_test.go, the parts the server owns): progress
//! recording, finishing with req_extra, and the resume callback for unfinished workflows.

use dtm_testkit::{Busi, TestServer};
use serde_json::json;

type R = anyhow::Result<()>;

#[tokio::test]
async fn workflow_progress_finish_and_resume() -> R {
    let (s, b) = (TestServer::start().await?, Busi::start().await?);
    let gid = s.new_gid().await?;
    let input = dtm_proto::base64_encode(b"{\"amount\":30}");
    let prep = json!({"gid": gid, "trans_type": "workflow", "query_prepared": b.route("WorkflowResume"),
        "custom_data": json!({"name": "transfer", "data": input}).to_string()});
    let (code, v) = s.post("prepareWorkflow", &prep).await?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["transaction"]["status"], "prepared");
    assert_eq!(v["progresses"], json!([]));

    // an unfinished workflow is resumed through its callback, with name and input
    s.kick(&gid).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while b.calls_for(&gid).is_empty() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no resume call");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let c = &b.calls_for(&gid)[0];
    assert_eq!(
        (c.route.as_str(), c.q("op"), c.q("branch_id")),
        ("WorkflowResume", "transfer", "00")
    );
    assert_eq!(c.body, "{\"amount\":30}");

    // progress
    let step = |id: &str, st: &str| json!({"gid": gid, "trans_type": "workflow", "branch_id": id, "op": "action", "status": st, "data": "result"});
    assert_eq!(
        s.post("registerBranch", &step("01", "succeed")).await?.0,
        200
    );
    assert_ne!(
        s.post("registerBranch", &step("01", "succeed")).await?.0,
        200,
        "duplicate progress"
    );
    assert_eq!(s.post("registerBranch", &step("02", "bogus")).await?.0, 400);
    let (_, v) = s.post("prepareWorkflow", &prep).await?;
    assert_eq!(v["progresses"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        v["progresses"][0]["bin_data"],
        dtm_proto::base64_encode(b"result")
    );

    // finish
    let fin = json!({"gid": gid, "trans_type": "workflow", "req_extra": {"status": "succeed", "result": "cmVz"}});
    assert_eq!(s.post("submit", &fin).await?.0, 200);
    let (t, _) = s.query(&gid).await?;
    assert_eq!(t["status"], "succeed");
    assert_eq!(t["result"], "cmVz");
    assert_ne!(s.post("submit", &fin).await?.0, 200, "finished already");
    // a re-execution gets the stored outcome
    let (_, v) = s.post("prepareWorkflow", &prep).await?;
    assert_eq!(v["transaction"]["status"], "succeed");
    Ok(())
}

/// An unfinished workflow is resumed every RetryInterval (1 s here) without backoff and
/// never times out (TimeoutToFail is 3 s here); a failed step is recorded as such; a
/// finish with `status: failed` stores the rollback reason, keeps the stored fields, and
/// a re-execution gets it back.
#[tokio::test]
async fn workflow_resumes_without_backoff_and_finishes_failed() -> R {
    let (s, b) = (TestServer::start().await?, Busi::start().await?);
    let gid = s.new_gid().await?;
    let prep = json!({"gid": gid, "trans_type": "workflow", "query_prepared": b.route("WorkflowResume"),
        "custom_data": json!({"name": "wf", "data": ""}).to_string()});
    assert_eq!(s.post("prepareWorkflow", &prep).await?.0, 200);
    let (before, _) = s.query(&gid).await?;
    s.kick(&gid).await?;
    tokio::time::sleep(std::time::Duration::from_millis(5500)).await;
    let resumes = b
        .calls_for(&gid)
        .iter()
        .filter(|c| c.route == "WorkflowResume")
        .count();
    // at 0, 1, 2, 3, 4 and 5 s; a doubling backoff would give 0, 1 and 3 s only
    assert!(resumes >= 4, "{resumes} resume calls in 5.5 s");
    assert_eq!(
        s.status(&gid).await?,
        "prepared",
        "workflows do not time out"
    );

    let step = json!({"gid": gid, "trans_type": "workflow", "branch_id": "01", "op": "action",
        "status": "failed", "data": "insufficient balance"});
    assert_eq!(s.post("registerBranch", &step).await?.0, 200);
    let fin = json!({"gid": gid, "trans_type": "workflow",
        "req_extra": {"status": "failed", "rollback_reason": "insufficient balance"}});
    assert_eq!(s.post("submit", &fin).await?.0, 200);
    let (t, branches) = s.query(&gid).await?;
    assert_eq!(t["status"], "failed");
    assert_eq!(t["rollback_reason"], "insufficient balance");
    assert_eq!(branches, ["failed"]);
    for k in ["create_time", "query_prepared", "custom_data", "protocol"] {
        assert_eq!(t[k], before[k], "{k} kept by the finish");
    }
    let (_, v) = s.post("prepareWorkflow", &prep).await?;
    assert_eq!(v["transaction"]["status"], "failed");
    assert_eq!(v["transaction"]["rollback_reason"], "insufficient balance");
    assert_eq!(v["progresses"][0]["status"], "failed");
    // finished: no more resumes
    let n = b.calls_for(&gid).len();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(b.calls_for(&gid).len(), n);
    Ok(())
}
