"""The Open Inference Protocol's (KServe v2) gRPC messages, generated from
`grpc_predict_v2.proto` by `generate.sh` (committed; never edit the generated files)."""
