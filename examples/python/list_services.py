"""Lists what a tessera coordinator's public port offers, with grpcio-reflection's stock client
(server reflection v1alpha), and resolves tessera.v1.Inference's methods through it. Needs no
generated stubs.

Usage: python list_services.py [--endpoint 127.0.0.1:50051]

Prints one service name a line, then one line per Inference method: "method NAME INPUT OUTPUT".
"""

import argparse
import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--endpoint", default="127.0.0.1:50051")
    args = ap.parse_args()
    with grpc.insecure_channel(args.endpoint) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        for name in sorted(db.get_services()):
            print(name)
        service = DescriptorPool(db).FindServiceByName("tessera.v1.Inference")
        for m in service.methods:
            print("method", m.name, m.input_type.full_name, m.output_type.full_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
