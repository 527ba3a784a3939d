"""Generates the Python gRPC stubs for tessera's protos into ./tessera_pb (run before client.py).

Usage: python generate_stubs.py
"""

import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
OUT = HERE / "tessera_pb"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "tessera" / "v1").glob("*.proto"))
    # grpc_tools ships the well-known protos; include them so imports resolve.
    import grpc_tools

    wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{wkt}",
            f"--python_out={OUT}",
            f"--grpc_python_out={OUT}",
            *protos,
        ]
    )
    if rc != 0:
        print(f"protoc failed with {rc}", file=sys.stderr)
        return rc
    # Generated modules import each other as `tessera.v1...`; make the output a package root.
    for d in [OUT, OUT / "tessera", OUT / "tessera" / "v1"]:
        (d / "__init__.py").touch()
    print(f"stubs written to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
