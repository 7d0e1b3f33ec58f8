"""Generated protobuf messages of the meshfed config protocol (source: ztunnel/api/proto/meshfed.proto).

Regenerate with `scripts/gen-proto.sh`; never edit meshfed_pb2.py by hand.
"""
