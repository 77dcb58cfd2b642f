//! vmpod-cri: the CRI v1 gRPC services (thin; logic lives in vmpod-runtime / vmpod-images).
