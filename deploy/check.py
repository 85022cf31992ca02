#!/usr/bin/env python3
"""Checks the deployment the way a cluster would, with real Helm and the real Kubernetes schemas.

  check.py render            print the chart rendered by Helm v4's library (helm-python-sdk)
  check.py all [KUBE_VER]    lint the chart strictly, render it, and validate the rendered
                             objects and deploy/kubernetes/*.yaml against the schemas of
                             Kubernetes KUBE_VER (default: the oldest version we support)

`cargo xtask setup` installs both PyPI packages; `cargo xtask lint` runs `all`.
"""
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "helm", "interceptor")
MANIFESTS = os.path.join(HERE, "kubernetes")
# The oldest Kubernetes the agent supports (k8s-openapi's v1_33 feature in Cargo.toml).
OLDEST_KUBERNETES = "1.33.0"
NAMESPACE = "interceptor-system"


def render() -> str:
    import helm_python

    chart = helm_python.Chart.load(CHART)
    out = chart.render(name="interceptor", namespace=NAMESPACE, is_install=True)
    docs = [text for path, text in sorted(out.items()) if path.endswith((".yaml", ".yml"))]
    return "\n---\n".join(docs) + "\n"


def lint() -> None:
    import helm_python

    result = helm_python.lint(CHART, strict=True)
    for m in result.get("messages", []):
        print(f"helm lint: {m.get('path')}: {m.get('error')} (severity {m.get('severity')})")
    if result.get("errors"):
        sys.exit(f"helm lint --strict failed: {result['errors']}")


def validate(files, version: str) -> None:
    # As a module: pip's console script may not be on PATH (pyenv shims need a rehash).
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, *files]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        print(done.stderr, end="", file=sys.stderr)
        sys.exit(f"`{' '.join(cmd)}` failed (exit {done.returncode})")


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what == "render":
        sys.stdout.write(render())
        return
    if what != "all":
        sys.exit(__doc__)
    version = sys.argv[2] if len(sys.argv) > 2 else OLDEST_KUBERNETES
    lint()
    with tempfile.TemporaryDirectory() as tmp:
        rendered = os.path.join(tmp, "helm-rendered.yaml")
        with open(rendered, "w") as f:
            f.write(render())
        manifests = sorted(
            os.path.join(MANIFESTS, n) for n in os.listdir(MANIFESTS) if n.endswith(".yaml")
        )
        validate([rendered, *manifests], version)
    print(f"deploy: chart lints strictly, renders, and it and {len(manifests)} manifest(s) "
          f"validate against Kubernetes {version}")


if __name__ == "__main__":
    main()
