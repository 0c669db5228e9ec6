//! Small system helpers the layers above share: the wall clock, waiting on
//! descriptors, netlink requests, the stop flag. Nothing here knows about meshes.

pub mod clock;
pub mod netlink;
pub mod poll;
pub mod shutdown;
