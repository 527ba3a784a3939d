"""Streams an answer from a tessera cluster over gRPC, using stubs made by generate_stubs.py.

Usage: python client.py [--endpoint 127.0.0.1:50051] [--max-tokens N] [--chat] "prompt"

Prints the text as it arrives, then one line on stderr: the finish reason and usage.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "tessera_pb"))

import grpc  # noqa: E402
from tessera.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("prompt")
    ap.add_argument("--endpoint", default="127.0.0.1:50051")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--chat", action="store_true")
    args = ap.parse_args()

    req = inference_pb2.GenerateRequest(
        sampling=inference_pb2.SamplingParams(temperature=args.temperature),
        stop=inference_pb2.StopConditions(max_tokens=args.max_tokens),
        logprobs=True,
    )
    if args.chat:
        req.chat.messages.add(role="user", content=args.prompt)
    else:
        req.text = args.prompt

    with grpc.insecure_channel(args.endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        tokens = 0
        try:
            for event in stub.Generate(req, timeout=120):
                kind = event.WhichOneof("event")
                if kind == "token":
                    tokens += 1
                    sys.stdout.write(event.token.text)
                    sys.stdout.flush()
                elif kind == "finished":
                    f = event.finished
                    sys.stdout.write(f.text)
                    reason = inference_pb2.FinishReason.Name(f.reason)
                    print()
                    print(
                        f"finish={reason} tokens={tokens} prompt_tokens={f.usage.prompt_tokens} "
                        f"completion_tokens={f.usage.completion_tokens} "
                        f"ttft_ms={f.usage.time_to_first_token_ms:.1f}",
                        file=sys.stderr,
                    )
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
