//! The messages of the `payments.Payments` gRPC service, written out as
//! prost's code generator would, so that neither the example nor its tests
//! need `protoc`.

/// The one method of the service.
pub(crate) const CHARGE: &str = "/payments.Payments/Charge";

/// `message ChargeRequest { uint64 amount = 1; string currency = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ChargeRequest {
    #[prost(uint64, tag = "1")]
    pub(crate) amount: u64,
    #[prost(string, tag = "2")]
    pub(crate) currency: String,
}

/// `message ChargeReply { string id = 1; uint64 amount = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ChargeReply {
    #[prost(string, tag = "1")]
    pub(crate) id: String,
    #[prost(uint64, tag = "2")]
    pub(crate) amount: u64,
}
