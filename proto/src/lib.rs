//! vmpod-proto: the guest agent ttrpc protocol, generated once for host and guest.
