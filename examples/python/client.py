"""Streams an answer from a tessera cluster over gRPC, using stubs made by generate_stubs.py.

Usage: python client.py [--endpoint 127.0.0.1:50051[,HOST:PORT...]] [--max-tokens N]
                        [--temperature T] [--seed S] [--chat] "prompt"

Prints the text as it arrives, then one line on stderr: the finish reason and usage.

Resumes transparently: when the coordinator it streams from dies mid-answer (the stream
breaks with UNKNOWN or CANCELLED, or UNAVAILABLE not marked final), it sends the same request
to the next endpoint of --endpoint (or the same one again) with the request id and seed the first
response named (headers x-request-id and x-tessera-seed) and a Resume of the token ids it
already has; the cluster continues with exactly the tokens the broken stream would have sent.
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "tessera_pb"))

import grpc  # noqa: E402
from tessera.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

# How often one answer may be resumed, and how long to wait between tries.
MAX_RESUMES = 5
RETRY_PAUSE_S = 0.5


def resumable(e: grpc.RpcError) -> bool:
    """A torn connection, or UNAVAILABLE that the cluster did not mark final."""
    if e.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
        return True
    if e.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailers = dict(e.trailing_metadata() or ())
    return "tessera-final" not in trailers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("prompt")
    ap.add_argument("--endpoint", default="127.0.0.1:50051")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--chat", action="store_true")
    args = ap.parse_args()
    endpoints = [e for e in args.endpoint.split(",") if e]

    req = inference_pb2.GenerateRequest(
        sampling=inference_pb2.SamplingParams(temperature=args.temperature),
        stop=inference_pb2.StopConditions(max_tokens=args.max_tokens),
        logprobs=True,
    )
    if args.seed is not None:
        req.sampling.seed = args.seed
    if args.chat:
        req.chat.messages.add(role="user", content=args.prompt)
    else:
        req.text = args.prompt

    tokens = []
    resumes = 0
    attempt = 0
    while True:
        endpoint = endpoints[attempt % len(endpoints)]
        try:
            with grpc.insecure_channel(endpoint) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                call = stub.Generate(req, timeout=120)
                # Pin the request to its id and seed, so a resumption continues it.
                headers = dict(call.initial_metadata() or ())
                if not req.request_id and "x-request-id" in headers:
                    req.request_id = headers["x-request-id"]
                if not req.sampling.HasField("seed") and "x-tessera-seed" in headers:
                    req.sampling.seed = int(headers["x-tessera-seed"])
                for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "token":
                        tokens.append(event.token.id)
                        sys.stdout.write(event.token.text)
                        sys.stdout.flush()
                    elif kind == "finished":
                        f = event.finished
                        sys.stdout.write(f.text)
                        reason = inference_pb2.FinishReason.Name(f.reason)
                        print()
                        print(
                            f"finish={reason} tokens={len(tokens)} "
                            f"prompt_tokens={f.usage.prompt_tokens} "
                            f"completion_tokens={f.usage.completion_tokens} "
                            f"ttft_ms={f.usage.time_to_first_token_ms:.1f} resumes={resumes}",
                            file=sys.stderr,
                        )
                        return 0
                raise RuntimeError("the stream ended without a finished event")
        except grpc.RpcError as e:
            if not resumable(e) or resumes >= MAX_RESUMES:
                print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            resumes += 1
            attempt += 1
            print(
                f"resuming after {len(tokens)} tokens on "
                f"{endpoints[attempt % len(endpoints)]}: {e.code().name}",
                file=sys.stderr,
            )
            req.resume.tokens[:] = tokens
            time.sleep(RETRY_PAUSE_S)


if __name__ == "__main__":
    sys.exit(main())
