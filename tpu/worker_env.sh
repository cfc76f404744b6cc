# shellcheck shell=sh
# Sourced on every TPU VM worker by `launch.py run`, from the checkout that `launch.py setup` made:
#   cd openr1-jax && . tpu/worker_env.sh && openr1-jax sft ...
# It puts the project's venv first on PATH and sets the variables openr1_jax/sharding/distributed.py reads
# (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), so every worker joins the same
# jax.distributed job. A `gcloud compute tpus tpu-vm ssh` session does not carry TPU_WORKER_HOSTNAMES: the
# worker list and this worker's number live in the TPU metadata, read here the way jax's own GCE TPU cluster
# detection reads them (worker-network-endpoints, agent-worker-number). One worker gives
# JAX_NUM_PROCESSES=1, which openr1-jax treats as a single process.
# Override the coordinator port with JAX_COORDINATOR_PORT; GCE_METADATA_IP points tests at a fake server.

PATH="$PWD/.venv/bin:$PATH"
export PATH

_md="http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes"
if ! _eps=$(curl -sf -H 'Metadata-Flavor: Google' "$_md/worker-network-endpoints") ||
    ! _id=$(curl -sf -H 'Metadata-Flavor: Google' "$_md/agent-worker-number"); then
    echo "worker_env.sh: no TPU worker list from the metadata server at $_md; is this a TPU VM?" >&2
    unset _md _eps _id
    return 1
fi
# Entries are 'name:id:ip' (older runtimes) or plain hosts; worker 0 (listed first) is the coordinator.
_first=${_eps%%,*}
JAX_COORDINATOR_ADDRESS="${_first##*:}:${JAX_COORDINATOR_PORT:-8482}"
JAX_NUM_PROCESSES=$(printf '%s\n' "$_eps" | tr ',' '\n' | grep -c .)
JAX_PROCESS_ID=$_id
export JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
unset _md _eps _id _first
