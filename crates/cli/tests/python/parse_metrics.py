"""Parses a Prometheus text exposition (0.0.4) from stdin with the classic parser of the
official Python client, `prometheus_client.parser.text_string_to_metric_families`, and prints
one JSON object: each family's name and type, and its sample count. A family the parser could
not type comes out as "unknown"."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

families = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    families[family.name] = {"type": family.type, "samples": len(family.samples)}
print(json.dumps(families))
