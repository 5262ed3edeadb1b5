#!/usr/bin/env bash
# The checks that need a CUDA GPU, as short runs for a session that is lent one.
#
#   benchmarks/device_wheels.sh                   # here, once: fedmi's dependencies the GPU image lacks
#   device run: bash benchmarks/device_check.sh [STAGE ...]     # there, with carry [".whl"], timeout_s 600
#
# Stages (default: tests adrenal-fedavg adrenal-mix, which fit one 600 s call):
#   tests          tests/test_device.py: every site-side method, FedBN on a ResNet, robust aggregation
#                  and the protocol's centralised settings give the CPU's models on the GPU, and
#                  nothing leaves the sites on it (at most 150 s).
#   adrenal-fedavg AdrenalMNIST3D at MedMNIST v2's full recipe (ResNet-18 at full width, 100 epochs
#   adrenal-mix    or rounds, Adam 0.001, x0.1 at 50% and 75%, batch 32), FedAvg over four IID sites
#                  or pooled training, one seed: what this CPU machine cannot afford (README,
#                  "AdrenalMNIST3D against MedMNIST v2").
#   breast-fedavg  BreastMNIST FedAvg at full width on 546 training images, 3 seeds (README, "The
#                  paper's own recipe"): the comparison with the full-width centralised recipe.
# Each training stage has its own limit (DEVICE_CHECK_LIMIT, 200 s) and its log times every round,
# so a run cut short still says how long the whole would take. Not yet run on a GPU.
# Everything lands in $OUT (the device tool's folder; ./device-check elsewhere).
set -uo pipefail
OUT=${OUT:-device-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
RECIPE=(--holdout official --shift 0 --partition iid --model resnet18 --model-options "{widen_factor: 1.0}"
        --optimizer adam --lr 0.001 --lr-milestones 0.5,0.75 --batch-size 32 --local-epochs 1
        --rounds 100 --epochs 100 --device cuda --verbose)

train() {  # stage name, then fedmi table2's own arguments
  local name=$1; shift
  timeout "${DEVICE_CHECK_LIMIT:-200}" python3 -m fedmi table2 "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"; tail -n 15 "$OUT/$name.log"
}

for stage in "${@:-tests adrenal-fedavg adrenal-mix}"; do
  for s in $stage; do
    case $s in
      tests) timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/tests.log" ;;
      adrenal-fedavg) train "$s" --dataset adrenalmnist3d "${RECIPE[@]}" --methods fedavg --repeats 1 ;;
      adrenal-mix) train "$s" --dataset adrenalmnist3d "${RECIPE[@]}" --methods mix --repeats 1 ;;
      breast-fedavg) train "$s" --dataset breastmnist "${RECIPE[@]}" --methods fedavg --repeats 3 --test-fraction 0.125 ;;
      *) echo "unknown stage '$s': tests, adrenal-fedavg, adrenal-mix, breast-fedavg"; exit 2 ;;
    esac
  done
done
