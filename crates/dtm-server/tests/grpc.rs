//! gRPC scenarios (dtm test/saga_grpc_test.go, msg_grpc_test.go, tcc_grpc_test.go,
//! dtmsvr_test.go TestGrpcPanic, common_test.go TestMustGenGid, topic_test.go over gRPC,
//! workflow resume over gRPC): a tonic client generated from our dtmgimp.proto drives the
//! server, and the branches are the gRPC busi simulator, over real sockets, against the
//! backend of `DTM_TEST_STORE`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dtm_proto::pb::dtmgimp::dtm_client::DtmClient;
use dtm_proto::pb::dtmgimp::{DtmBranchRequest, DtmRequest, DtmTopicRequest, DtmTransOptions};
use dtm_testkit::busi_grpc::req_grpc;
use dtm_testkit::grpc::dtm_request;
use dtm_testkit::{Busi, BusiGrpc, TestServer, slot};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

type R = anyhow::Result<()>;

struct Env {
    s: TestServer,
    b: Busi,
    g: BusiGrpc,
    dtm: DtmClient<Channel>,
}

async fn setup() -> anyhow::Result<Env> {
    let s = TestServer::start().await?;
    let b = Busi::start().await?;
    let g = BusiGrpc::start(&b).await?;
    let dtm = s.dtm_client().await?;
    Ok(Env { s, b, g, dtm })
}

impl Env {
    async fn gid(&mut self) -> anyhow::Result<String> {
        Ok(self.dtm.new_gid(()).await?.into_inner().gid)
    }

    /// A saga of (action, compensate) busi.Busi methods ("" = no URL), amount 30 each.
    fn saga(&self, gid: &str, steps: &[(&str, &str)]) -> DtmRequest {
        let url = |m: &str| {
            if m.is_empty() {
                String::new()
            } else {
                self.g.route(m)
            }
        };
        let steps: Vec<(String, String)> = steps.iter().map(|(a, c)| (url(a), url(c))).collect();
        let payloads = steps.iter().map(|_| req_grpc(30, "", "")).collect();
        dtm_request(gid, "saga", &steps, payloads)
    }

    fn transfer(&self, gid: &str) -> DtmRequest {
        self.saga(
            gid,
            &[("TransOut", "TransOutRevert"), ("TransIn", "TransInRevert")],
        )
    }

    fn msg(&self, gid: &str, actions: &[&str]) -> DtmRequest {
        let steps: Vec<(String, String)> = actions
            .iter()
            .map(|a| (self.g.route(a), String::new()))
            .collect();
        let payloads = actions.iter().map(|_| req_grpc(30, "", "")).collect();
        let mut r = dtm_request(gid, "msg", &steps, payloads);
        r.query_prepared = self.g.route("QueryPrepared");
        r
    }

    /// A `PrepareWorkflow` request for workflow `name` with input `data`, resumed through
    /// the simulator's workflow service.
    fn workflow(&self, gid: &str, name: &str, data: &[u8]) -> DtmRequest {
        DtmRequest {
            gid: gid.into(),
            trans_type: "workflow".into(),
            query_prepared: self.g.workflow_url(),
            customed_data: json!({"name": name, "data": dtm_proto::base64_encode(data)})
                .to_string(),
            steps: "null".into(),
            ..Default::default()
        }
    }

    /// Wait until `route` was called for `gid` at least `n` times.
    async fn wait_calls(&self, gid: &str, route: &str, n: usize) -> R {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self
                .b
                .calls_for(gid)
                .iter()
                .filter(|c| c.route == route)
                .count();
            if got >= n {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{route} called {got} times for {gid}, expected {n}; trace {:?}",
                self.b.trace(gid)
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
}

fn opts(f: impl FnOnce(&mut DtmTransOptions)) -> Option<DtmTransOptions> {
    let mut o = DtmTransOptions::default();
    f(&mut o);
    Some(o)
}

// ---------------------------------------------------------------- the Dtm service itself

#[tokio::test]
async fn grpc_new_gid_and_input_errors() -> R {
    let mut e = setup().await?;
    let a = e.gid().await?;
    let b = e.gid().await?;
    assert_eq!(a.len(), 22);
    assert_ne!(a, b);

    // dtm TestGrpcPanic: a Submit with only a gid is an error (dtm: Internal; here the
    // input is refused with InvalidArgument and a message saying what is missing)
    let err = e
        .dtm
        .submit(DtmRequest {
            gid: a.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("trans_type"), "{err:?}");

    // unreadable steps
    let mut r = e.transfer(&a);
    r.steps = "[{\"action\":".into();
    let err = e.dtm.submit(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("Steps"), "{err:?}");

    // a discovery-driver URL is refused at submit, not retried forever
    let mut r = e.transfer(&a);
    r.steps = json!([{"action": "etcd://127.0.0.1:2379/busi/busi.Busi/TransOut"}]).to_string();
    r.bin_payloads.truncate(1);
    let err = e.dtm.submit(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // abort of an unknown gid
    let err = e
        .dtm
        .abort(DtmRequest {
            gid: "no-such-gid".into(),
            trans_type: "tcc".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // registerBranch on a missing global is dtm's FAILURE: Aborted
    let err = e
        .dtm
        .register_branch(DtmBranchRequest {
            gid: "no-such-gid".into(),
            trans_type: "tcc".into(),
            branch_id: "01".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("FAILURE"), "{err:?}");

    // gRPC calls are counted as dtm labels them
    let m = e.s.metrics().await?;
    for line in [
        r#"dtm_server_process_total{type="grpc",api="newgid",status="ok"} 2"#,
        r#"dtm_server_process_total{type="grpc",api="submit",status="fail"} 3"#,
        r#"dtm_server_process_total{type="grpc",api="registerbranch",status="fail"} 1"#,
    ] {
        assert!(m.contains(line), "{line} not in\n{m}");
    }
    Ok(())
}

#[tokio::test]
async fn grpc_reflection_lists_the_dtm_service() -> R {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let e = setup().await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", e.s.grpc))?
        .connect()
        .await?;
    let mut c = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await?
        .into_inner();
    let resp = stream
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no reflection answer"))?;
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        anyhow::bail!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"dtmgimp.Dtm".to_string()), "{names:?}");
    Ok(())
}

#[tokio::test]
async fn grpc_topics() -> R {
    let mut e = setup().await?;
    let sub = |topic: &str, url: &str| DtmTopicRequest {
        topic: topic.into(),
        url: url.into(),
        remark: "r".into(),
    };
    let out = e.g.route("TransOut");
    let inn = e.g.route("TransIn");
    e.dtm.subscribe(sub("grpc_trans", &out)).await?;
    let err = e.dtm.subscribe(sub("grpc_trans", &out)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "the same url again: {err:?}");
    assert!(e.dtm.subscribe(sub("", &out)).await.is_err());
    assert!(e.dtm.subscribe(sub("grpc_trans", "")).await.is_err());
    e.dtm.subscribe(sub("grpc_trans", &inn)).await?;

    // a msg through the topic calls both subscribers
    let gid = e.gid().await?;
    let mut r = dtm_request(
        &gid,
        "msg",
        &[("topic://grpc_trans".to_string(), String::new())],
        vec![req_grpc(30, "", "")],
    );
    r.query_prepared = e.g.route("QueryPrepared");
    e.dtm.submit(r).await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "ss");

    e.dtm.unsubscribe(sub("grpc_trans", &out)).await?;
    assert!(e.dtm.unsubscribe(sub("grpc_trans", &out)).await.is_err());
    assert!(e.dtm.unsubscribe(sub("nobody", &out)).await.is_err());
    e.dtm.unsubscribe(sub("grpc_trans", &inn)).await?;
    let err = e
        .dtm
        .unsubscribe(sub("grpc_trans", &inn))
        .await
        .unwrap_err();
    assert!(err.message().contains("empty"), "{err:?}");
    let err = e.dtm.delete_topic(sub("nobody", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    e.dtm.delete_topic(sub("grpc_trans", "")).await?;
    Ok(())
}

// ---------------------------------------------------------------- saga over gRPC

#[tokio::test]
async fn saga_grpc_normal() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    e.dtm.submit(e.transfer(&gid)).await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "psps");
    assert_eq!(e.b.trace(&gid), ["TransOut/action", "TransIn/action"]);
    let (t, _) = e.s.query(&gid).await?;
    assert_eq!(t["protocol"], "grpc");
    // the stored payload reached the branch unchanged, with dtm's metadata
    let c = &e.b.calls_for(&gid)[0];
    assert_eq!(c.method, "GRPC");
    assert_eq!(
        (c.q("trans_type"), c.q("branch_id"), c.q("op"), c.q("dtm")),
        ("saga", "01", "action", "")
    );
    let body: Value = serde_json::from_str(&c.body)?;
    assert_eq!(body["Amount"], 30);
    Ok(())
}

#[tokio::test]
async fn saga_grpc_rollback() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    e.b.set_once(slot::TRANS_IN, "FAILURE");
    e.b.set_once(slot::FAILURE_REASON, "Insufficient balance");
    e.b.set_once(slot::TRANS_OUT_REVERT, "ONGOING");
    e.dtm.submit(e.transfer(&gid)).await?;
    e.s.wait_status(&gid, "aborting", 10).await?;
    e.s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "sssf");
    assert_eq!(
        e.b.trace(&gid),
        [
            "TransOut/action",
            "TransIn/action",
            "TransInRevert/compensate",
            "TransOutRevert/compensate",
            "TransOutRevert/compensate"
        ]
    );
    let (t, _) = e.s.query(&gid).await?;
    let reason = t["rollback_reason"].as_str().unwrap_or("");
    assert!(reason.contains("Insufficient balance"), "{t}");
    Ok(())
}

#[tokio::test]
async fn saga_grpc_failure_from_the_request_field() -> R {
    // dtm's busi takes the result from ReqGrpc.TransInResult when no switch is armed
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let mut r = e.transfer(&gid);
    r.bin_payloads = vec![req_grpc(30, "", "FAILURE"), req_grpc(30, "", "FAILURE")];
    e.dtm.submit(r).await?;
    e.s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "sssf");
    Ok(())
}

#[tokio::test]
async fn saga_grpc_concurrent_with_orders() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let mut r = e.transfer(&gid);
    r.customed_data = json!({"concurrent": true}).to_string();
    e.dtm.submit(r).await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "psps");

    let gid = e.gid().await?;
    let mut r = e.transfer(&gid);
    r.customed_data = json!({"concurrent": true, "orders": {"1": [0]}}).to_string();
    e.dtm.submit(r).await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.b.trace(&gid), ["TransOut/action", "TransIn/action"]);
    Ok(())
}

#[tokio::test]
async fn saga_grpc_committed_ongoing() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    e.b.set_sticky("TransOut", "ONGOING");
    e.dtm.submit(e.transfer(&gid)).await?;
    e.wait_calls(&gid, "TransOut", 1).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(e.s.status(&gid).await?, "submitted");
    assert_eq!(e.s.branches(&gid).await?, "pppp");
    e.b.clear_sticky("TransOut");
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "psps");
    Ok(())
}

/// The largest request_timeout a client can send is held to 68 years before it reaches
/// the gRPC client, which refuses a deadline beyond 11,000 years.
#[tokio::test]
async fn saga_grpc_extreme_request_timeout() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let mut r = e.transfer(&gid);
    r.trans_options = opts(|o| {
        o.wait_result = true;
        o.request_timeout = i64::MAX;
    });
    e.dtm.submit(r).await?;
    assert_eq!(e.s.status(&gid).await?, "succeed");
    assert_eq!(e.s.branches(&gid).await?, "psps");
    Ok(())
}

#[tokio::test]
async fn saga_grpc_wait_result() -> R {
    let mut e = setup().await?;
    // success: final statuses are there when Submit returns
    let gid = e.gid().await?;
    let mut r = e.transfer(&gid);
    r.trans_options = opts(|o| {
        o.wait_result = true;
        o.request_timeout = 6;
    });
    e.dtm.submit(r).await?;
    assert_eq!(e.s.status(&gid).await?, "succeed");
    assert_eq!(e.s.branches(&gid).await?, "psps");

    // rollback: Aborted with the reason
    let gid = e.gid().await?;
    e.b.set_once(slot::TRANS_IN, "FAILURE");
    e.b.set_once(slot::FAILURE_REASON, "Insufficient balance");
    let mut r = e.transfer(&gid);
    r.trans_options = opts(|o| o.wait_result = true);
    let err = e.dtm.submit(r).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("Insufficient balance"), "{err:?}");
    assert_eq!(e.s.status(&gid).await?, "failed");
    assert_eq!(e.s.branches(&gid).await?, "sssf");

    // ongoing: an error as in dtm (the saga is not succeed yet: FAILURE "wait result not
    // return success"), and the saga finishes later
    let gid = e.gid().await?;
    e.b.set_once(slot::TRANS_OUT, "ONGOING");
    let mut r = e.transfer(&gid);
    r.trans_options = opts(|o| o.wait_result = true);
    let err = e.dtm.submit(r).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(
        err.message().contains("wait result not return success"),
        "{err:?}"
    );
    assert_eq!(e.s.branches(&gid).await?, "pppp");
    e.s.wait_status(&gid, "succeed", 10).await?;
    Ok(())
}

#[tokio::test]
async fn saga_grpc_empty_url() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    e.dtm
        .submit(e.saga(
            &gid,
            &[("TransOut", "TransOutRevert"), ("", "TransInRevert")],
        ))
        .await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "psps");
    assert_eq!(e.b.trace(&gid), ["TransOut/action"]);
    Ok(())
}

#[tokio::test]
async fn saga_grpc_headers_reach_metadata_on_every_call() -> R {
    let mut e = setup().await?;
    let headers: HashMap<String, String> = [("test_header".to_string(), "test".to_string())].into();
    let gid = e.gid().await?;
    let mut r = e.saga(&gid, &[("TransOutHeaderYes", "")]);
    r.trans_options = opts(|o| {
        o.wait_result = true;
        o.branch_headers = headers.clone();
    });
    e.dtm.submit(r).await?;
    assert_eq!(e.s.status(&gid).await?, "succeed");

    // the headers are sent again by the recovery after an ONGOING answer
    let gid = e.gid().await?;
    e.b.set_once(slot::TRANS_OUT, "ONGOING");
    let mut r = e.saga(&gid, &[("TransOutHeaderYes", "")]);
    r.trans_options = opts(|o| o.branch_headers = headers.clone());
    e.dtm.submit(r).await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    let calls = e.b.calls_for(&gid);
    assert_eq!(calls.len(), 2);
    assert!(
        calls
            .iter()
            .all(|c| c.headers.get("test_header").map(String::as_str) == Some("test"))
    );

    // without the header the branch answers an error and the saga stays submitted
    let gid = e.gid().await?;
    e.dtm
        .submit(e.saga(&gid, &[("TransOutHeaderYes", "")]))
        .await?;
    e.wait_calls(&gid, "TransOutHeaderYes", 1).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(e.s.status(&gid).await?, "submitted");
    Ok(())
}

#[tokio::test]
async fn saga_grpc_mixes_http_branches() -> R {
    // a grpc transaction calls http(s):// URLs over HTTP (dtm §5.1)
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let steps = vec![
        (e.g.route("TransOut"), e.g.route("TransOutRevert")),
        (e.b.route("TransIn"), e.b.route("TransInRevert")),
    ];
    let payloads = vec![
        req_grpc(30, "", ""),
        json!({"amount": 30}).to_string().into_bytes(),
    ];
    e.dtm
        .submit(dtm_request(&gid, "saga", &steps, payloads))
        .await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    let calls = e.b.calls_for(&gid);
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].method.as_str(), calls[1].method.as_str()),
        ("GRPC", "POST")
    );
    assert_eq!(calls[1].body, json!({"amount": 30}).to_string());
    Ok(())
}

#[tokio::test]
async fn saga_grpc_request_timeout_and_unreachable_branch() -> R {
    let mut e = setup().await?;
    // the branch answers after the deadline: an error, retried until it is fast again
    let gid = e.gid().await?;
    e.b.set_delay(Duration::from_millis(3000));
    let mut r = e.saga(&gid, &[("TransOut", "")]);
    r.trans_options = opts(|o| {
        o.wait_result = true;
        o.request_timeout = 1;
    });
    let started = Instant::now();
    let err = e.dtm.submit(r).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the call gave up at its 1s deadline"
    );
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(e.s.status(&gid).await?, "submitted");
    e.b.set_delay(Duration::ZERO);
    e.s.wait_status(&gid, "succeed", 15).await?;

    // nothing listens there: an error, the saga stays submitted
    let gid = e.gid().await?;
    let port = dtm_testkit::free_port()?;
    let steps = vec![(
        format!("127.0.0.1:{port}/busi.Busi/TransOut"),
        String::new(),
    )];
    let mut r = dtm_request(&gid, "saga", &steps, vec![req_grpc(30, "", "")]);
    r.trans_options = opts(|o| o.wait_result = true);
    let err = e.dtm.submit(r).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok, "{err:?}");
    assert_eq!(e.s.status(&gid).await?, "submitted");
    Ok(())
}

// ---------------------------------------------------------------- msg over gRPC

#[tokio::test]
async fn msg_grpc_normal() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let r = e.msg(&gid, &["TransOut", "TransIn"]);
    e.dtm.prepare(r.clone()).await?;
    e.dtm.prepare(r.clone()).await?;
    assert_eq!(e.s.status(&gid).await?, "prepared");
    e.dtm.submit(r.clone()).await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "ss");
    assert_eq!(e.b.trace(&gid), ["TransOut/action", "TransIn/action"]);
    // dtm TestMsgAbnormal: prepare after success is FAILURE
    let err = e.dtm.prepare(r).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    Ok(())
}

#[tokio::test]
async fn msg_grpc_back_check_ongoing_then_success() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let mut r = e.msg(&gid, &["TransOut", "TransIn"]);
    r.trans_options = opts(|o| o.timeout_to_fail = 1);
    e.dtm.prepare(r).await?;
    e.b.set_sticky("QueryPrepared", "ONGOING");
    e.wait_calls(&gid, "QueryPrepared", 1).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(e.s.status(&gid).await?, "prepared");
    // the back-check is an empty message with op msg and branch 00
    let qp = &e.b.calls_for(&gid)[0];
    assert_eq!((qp.q("op"), qp.q("branch_id")), ("msg", "00"));
    assert_eq!(serde_json::from_str::<Value>(&qp.body)?["Amount"], 0);

    // the back-check says committed; the first action is ongoing for a while
    e.b.set_sticky("TransOut", "ONGOING");
    e.b.clear_sticky("QueryPrepared");
    e.s.wait_status(&gid, "submitted", 10).await?;
    e.wait_calls(&gid, "TransOut", 1).await?;
    assert_eq!(e.s.branches(&gid).await?, "pp");
    e.b.clear_sticky("TransOut");
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "ss");
    Ok(())
}

#[tokio::test]
async fn msg_grpc_back_check_failure() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let mut r = e.msg(&gid, &["TransOut", "TransIn"]);
    r.trans_options = opts(|o| o.timeout_to_fail = 1);
    e.dtm.prepare(r).await?;
    e.b.set_sticky("QueryPrepared", "ONGOING");
    e.wait_calls(&gid, "QueryPrepared", 1).await?;
    assert_eq!(e.s.status(&gid).await?, "prepared");
    e.b.set_sticky("QueryPrepared", "FAILURE");
    e.s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "pp");
    assert!(
        !e.b.trace(&gid).iter().any(|t| t.starts_with("Trans")),
        "no action called: {:?}",
        e.b.trace(&gid)
    );
    Ok(())
}

// ---------------------------------------------------------------- tcc over gRPC

async fn tcc_branch(e: &mut Env, gid: &str, id: &str, confirm: &str, cancel: &str) -> R {
    let data: HashMap<String, String> = [
        ("confirm".to_string(), e.g.route(confirm)),
        ("cancel".to_string(), e.g.route(cancel)),
    ]
    .into();
    e.dtm
        .register_branch(DtmBranchRequest {
            gid: gid.into(),
            trans_type: "tcc".into(),
            branch_id: id.into(),
            op: String::new(),
            data,
            busi_payload: req_grpc(30, "", ""),
        })
        .await?;
    Ok(())
}

fn tcc(gid: &str) -> DtmRequest {
    DtmRequest {
        gid: gid.into(),
        trans_type: "tcc".into(),
        // what dtm's Go client sends for a transaction without steps
        steps: "null".into(),
        trans_options: Some(DtmTransOptions::default()),
        ..Default::default()
    }
}

#[tokio::test]
async fn tcc_grpc_normal() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    e.dtm.prepare(tcc(&gid)).await?;
    tcc_branch(&mut e, &gid, "01", "TransOutConfirm", "TransOutRevert").await?;
    tcc_branch(&mut e, &gid, "02", "TransInConfirm", "TransInRevert").await?;
    e.dtm.submit(tcc(&gid)).await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "psps");
    assert_eq!(
        e.b.trace(&gid),
        ["TransInConfirm/confirm", "TransOutConfirm/confirm"]
    );
    let c = &e.b.calls_for(&gid)[0];
    assert_eq!((c.q("trans_type"), c.q("branch_id")), ("tcc", "02"));
    assert_eq!(serde_json::from_str::<Value>(&c.body)?["Amount"], 30);
    Ok(())
}

#[tokio::test]
async fn tcc_grpc_rollback_cancels_in_reverse_order() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    e.dtm.prepare(tcc(&gid)).await?;
    tcc_branch(&mut e, &gid, "01", "TransOutConfirm", "TransOutRevert").await?;
    tcc_branch(&mut e, &gid, "02", "TransInConfirm", "TransInRevert").await?;
    e.b.set_once(slot::TRANS_OUT_REVERT, "ONGOING");
    // the client's try failed; it aborts with the gRPC error text as the reason
    let mut r = tcc(&gid);
    r.rollback_reason = "rpc error: code = Aborted desc = reason:".into();
    e.dtm.abort(r).await?;
    e.s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "spsp");
    assert_eq!(
        e.b.trace(&gid),
        [
            "TransInRevert/cancel",
            "TransOutRevert/cancel",
            "TransOutRevert/cancel"
        ]
    );
    let (t, _) = e.s.query(&gid).await?;
    assert_eq!(
        t["rollback_reason"],
        "rpc error: code = Aborted desc = reason:"
    );
    // a finished tcc cannot be aborted again: FAILURE
    let err = e.dtm.abort(tcc(&gid)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    Ok(())
}

#[tokio::test]
async fn tcc_grpc_wait_result_with_headers() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let mut r = tcc(&gid);
    r.trans_options = opts(|o| {
        o.wait_result = true;
        o.branch_headers = [("test_header".to_string(), "test".to_string())].into();
    });
    e.dtm.prepare(r.clone()).await?;
    tcc_branch(&mut e, &gid, "01", "TransOutHeaderYes", "TransOutRevert").await?;
    e.dtm.submit(r).await?;
    assert_eq!(e.s.status(&gid).await?, "succeed");
    assert_eq!(e.s.branches(&gid).await?, "ps");
    Ok(())
}

/// dtm TestTccGrpcHeaders' shape: a branch registered over gRPC with empty confirm and
/// cancel URLs finishes without a call.
#[tokio::test]
async fn tcc_grpc_empty_confirm_and_cancel() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    e.dtm.prepare(tcc(&gid)).await?;
    e.dtm
        .register_branch(DtmBranchRequest {
            gid: gid.clone(),
            trans_type: "tcc".into(),
            branch_id: "01".into(),
            op: String::new(),
            data: [
                ("confirm".to_string(), String::new()),
                ("cancel".to_string(), String::new()),
            ]
            .into(),
            busi_payload: req_grpc(30, "", ""),
        })
        .await?;
    e.dtm.submit(tcc(&gid)).await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "ps");
    assert!(e.b.calls_for(&gid).is_empty());
    Ok(())
}

// ---------------------------------------------------------------- xa over gRPC

/// dtm TestXaGrpcNormal / TestXaGrpcRollback: XA branches registered over gRPC with
/// `Data{url}` are committed first to last on submit, rolled back on abort, as gRPC calls
/// carrying the op in the metadata.
#[tokio::test]
async fn xa_grpc_commits_in_order_and_rolls_back() -> R {
    let mut e = setup().await?;
    let xa = |gid: &str| DtmRequest {
        gid: gid.into(),
        trans_type: "xa".into(),
        steps: "null".into(),
        trans_options: Some(DtmTransOptions::default()),
        ..Default::default()
    };
    let register = |gid: &str, id: &str, url: String| DtmBranchRequest {
        gid: gid.into(),
        trans_type: "xa".into(),
        branch_id: id.into(),
        op: String::new(),
        data: [("url".to_string(), url)].into(),
        busi_payload: vec![],
    };
    let gid = e.gid().await?;
    e.dtm.prepare(xa(&gid)).await?;
    let (out, inn) = (e.g.route("TransOut"), e.g.route("TransIn"));
    e.dtm
        .register_branch(register(&gid, "01", out.clone()))
        .await?;
    e.dtm.register_branch(register(&gid, "02", inn)).await?;
    e.dtm.submit(xa(&gid)).await?;
    e.s.wait_status(&gid, "succeed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "psps");
    assert_eq!(e.b.trace(&gid), ["TransOut/commit", "TransIn/commit"]);
    let c = &e.b.calls_for(&gid)[0];
    assert_eq!((c.q("trans_type"), c.q("branch_id")), ("xa", "01"));

    let gid = e.gid().await?;
    e.dtm.prepare(xa(&gid)).await?;
    e.dtm.register_branch(register(&gid, "01", out)).await?;
    e.dtm.abort(xa(&gid)).await?;
    e.s.wait_status(&gid, "failed", 10).await?;
    assert_eq!(e.s.branches(&gid).await?, "sp");
    assert_eq!(e.b.trace(&gid), ["TransOut/rollback"]);
    Ok(())
}

// ---------------------------------------------------------------- workflow over gRPC

#[tokio::test]
async fn workflow_grpc_progress_and_resume() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let prep = e.workflow(&gid, "wf_transfer", b"input");
    let reply = e.dtm.prepare_workflow(prep.clone()).await?.into_inner();
    let t = reply.transaction.clone().unwrap_or_default();
    assert_eq!(
        (t.gid.as_str(), t.status.as_str()),
        (gid.as_str(), "prepared")
    );
    assert!(reply.progresses.is_empty());

    // progress recorded with a binary payload
    let step = |id: &str, st: &str| DtmBranchRequest {
        gid: gid.clone(),
        trans_type: "workflow".into(),
        branch_id: id.into(),
        op: "ignored".into(),
        data: [
            ("op".to_string(), "action".to_string()),
            ("status".to_string(), st.to_string()),
        ]
        .into(),
        busi_payload: vec![0, 159, 146, 150],
    };
    e.dtm.register_branch(step("01", "succeed")).await?;
    assert!(e.dtm.register_branch(step("01", "succeed")).await.is_err());
    let reply = e.dtm.prepare_workflow(prep.clone()).await?.into_inner();
    assert_eq!(reply.progresses.len(), 1);
    let p = &reply.progresses[0];
    assert_eq!(
        (p.branch_id.as_str(), p.op.as_str(), p.status.as_str()),
        ("01", "action", "succeed")
    );
    assert_eq!(p.bin_data, vec![0, 159, 146, 150]);

    // the unfinished workflow is resumed over gRPC: WorkflowData{Data} and dtm-op = name
    e.s.kick(&gid).await?;
    e.wait_calls(&gid, "Execute", 1).await?;
    let c =
        e.b.calls_for(&gid)
            .into_iter()
            .find(|c| c.route == "Execute")
            .ok_or_else(|| anyhow::anyhow!("no Execute"))?;
    assert_eq!(c.body, "input");
    assert_eq!(
        (c.q("op"), c.q("branch_id"), c.q("trans_type")),
        ("wf_transfer", "00", "workflow")
    );

    // finish; a re-run gets the stored result back (dtm leaves it empty over gRPC)
    let mut fin = prep.clone();
    fin.req_extra = [
        ("status".to_string(), "succeed".to_string()),
        ("result".to_string(), "cmVz".to_string()),
    ]
    .into();
    e.dtm.submit(fin.clone()).await?;
    assert_eq!(e.s.status(&gid).await?, "succeed");
    let reply = e.dtm.prepare_workflow(prep).await?.into_inner();
    let t = reply.transaction.unwrap_or_default();
    assert_eq!((t.status.as_str(), t.result.as_str()), ("succeed", "cmVz"));
    assert!(e.dtm.submit(fin).await.is_err(), "finished already");
    Ok(())
}

/// dtm TestWorkflowGrpcSimple's server part: a workflow finished over gRPC with
/// `status: failed` stores the reason, and a re-run gets it back.
#[tokio::test]
async fn workflow_grpc_finishes_failed() -> R {
    let mut e = setup().await?;
    let gid = e.gid().await?;
    let prep = e.workflow(&gid, "wf", b"");
    e.dtm.prepare_workflow(prep.clone()).await?;
    let mut fin = prep.clone();
    fin.req_extra = [
        ("status".to_string(), "failed".to_string()),
        (
            "rollback_reason".to_string(),
            "rpc error: code = Aborted desc = FAILURE".to_string(),
        ),
    ]
    .into();
    e.dtm.submit(fin).await?;
    let (t, _) = e.s.query(&gid).await?;
    assert_eq!(t["status"], "failed");
    assert_eq!(
        t["rollback_reason"],
        "rpc error: code = Aborted desc = FAILURE"
    );
    let reply = e.dtm.prepare_workflow(prep).await?.into_inner();
    let t = reply.transaction.unwrap_or_default();
    assert_eq!(
        (t.status.as_str(), t.rollback_reason.as_str()),
        ("failed", "rpc error: code = Aborted desc = FAILURE")
    );
    Ok(())
}

#[tokio::test]
async fn grpc_server_stops_gracefully_with_clients_connected() -> R {
    let mut e = setup().await?;
    e.gid().await?;
    let grpc = e.s.grpc.clone();
    let Env { s, mut dtm, .. } = e;
    // with a gRPC client connected
    s.shutdown_within(Duration::from_secs(2)).await?;
    assert!(dtm.new_gid(()).await.is_err(), "the gRPC port is closed");
    assert!(
        tokio::net::TcpStream::connect(&grpc).await.is_err(),
        "nothing listens on {grpc} any more"
    );
    Ok(())
}
