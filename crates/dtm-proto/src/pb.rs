//! Generated protobuf messages, tonic clients and servers.
//!
//! - [`dtmgimp`]: dtm's coordinator API (`dtmgimp.Dtm`), served by dtm-rs on the gRPC port;
//! - [`workflow`]: the workflow resume callback (`workflow.Workflow/Execute`) that gRPC
//!   workflow clients serve and the coordinator calls;
//! - [`busi`]: the gRPC side of the test branch simulator (`busi.Busi`).

#![allow(clippy::all, missing_docs)]

pub mod dtmgimp {
    tonic::include_proto!("dtmgimp");
}

pub mod workflow {
    tonic::include_proto!("workflow");
}

pub mod busi {
    tonic::include_proto!("busi");
}

/// Encoded `FileDescriptorSet` of every .proto above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dtm_descriptor");

/// The body of a workflow resume call over gRPC: `WorkflowData { Data = data }` encoded.
pub fn workflow_data(data: &[u8]) -> Vec<u8> {
    prost::Message::encode_to_vec(&workflow::WorkflowData {
        data: data.to_vec(),
    })
}
