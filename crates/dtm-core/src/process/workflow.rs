//! Workflow: the engine lives in the client. The server stores progress and, for an
//! unfinished workflow, calls the client's resume callback (`query_prepared`) with the
//! workflow's name as `op` and its input as body, every retry interval.

use dtm_proto::{BranchOutcome, status};

use super::{Ctx, PassEnd, Sched, Stop};

pub(crate) async fn process(ctx: &mut Ctx<'_>) -> Result<PassEnd, Stop> {
    if ctx.g.status != status::PREPARED {
        return Ok(PassEnd::Done);
    }
    let custom: serde_json::Value = serde_json::from_str(&ctx.g.custom_data).unwrap_or_default();
    let name = custom
        .get("name")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let data = custom
        .get("data")
        .and_then(|v| v.as_str())
        .and_then(dtm_proto::base64_decode)
        .unwrap_or_default();
    let url = ctx.g.query_prepared.clone();
    if url.is_empty() {
        ctx.touch(Sched::Reset).await?;
        return Ok(PassEnd::Done);
    }
    // the lease moves first: the callback may take as long as the workflow runs
    ctx.touch(Sched::Reset).await?;
    // dtm wraps the input in a WorkflowData message for gRPC workflows, whatever the URL
    let data = if ctx.g.protocol == dtm_proto::protocol::GRPC {
        dtm_proto::pb::workflow_data(&data)
    } else {
        data
    };
    let call = ctx.call(&url, data, "00", &name);
    match ctx.exec(call).await {
        BranchOutcome::Success | BranchOutcome::Ongoing(_) => Ok(PassEnd::Done),
        out => {
            tracing::info!(gid = %ctx.g.gid, "workflow resume callback {url}: {}", out.message());
            Ok(PassEnd::Done)
        }
    }
}
