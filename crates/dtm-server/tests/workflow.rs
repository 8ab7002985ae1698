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
