#!/bin/bash
# Every README figure of one seed (docs/EXPERIMENTS.md): the contract's evaluation with the stage matrix
# (old-class AP before -> after the increment) and the new classes' AP50 on their annotations alone.
# usage: bash experiments/evalall.sh MODEL RUN_DIR SEED   (writes outputs/eval-SEED-NAME[-new]; ~4 min)
# RUN_DIR, the training run's directory, adds the stage matrix (old-class AP before -> after the increment);
# "-" leaves it out (a fresh clone has the shipped checkpoint but no training run).
set -e
M=$1; R=$2; S=$3; W=outputs/val$S
[ "$R" = "-" ] && R=""
N=$(basename "${R:-$M}")
[ -d $W ] || python -m grounded_llava.data.synthetic --out $W --num-images 60 --seed $S --image-size 224 >/dev/null 2>&1
python - <<PY
import json
path = "$W/annotations"
data = json.load(open(path + ".json"))
new = {c["id"] for c in data["categories"] if c["name"] in ("ellipse", "diamond")}
data["categories"] = [c for c in data["categories"] if c["id"] in new]
data["annotations"] = [a for a in data["annotations"] if a["category_id"] in new]
json.dump(data, open(path + "_new_classes.json", "w"))
PY
python -m grounded_llava.evaluate --model $M --data $W/annotations.json --images $W/images --chat-data $W/chat.json \
  --out outputs/eval-$S-$N ${R:+--stages $R} --quiet > outputs/eval-$S-$N.log 2>&1
python -m grounded_llava.evaluate --model $M --data $W/annotations_new_classes.json --images $W/images \
  --out outputs/eval-$S-$N-new --tasks det --quiet > outputs/eval-$S-$N-new.log 2>&1
python - <<PY
import json
m = json.load(open("outputs/eval-$S-$N/metrics.json"))
n = json.load(open("outputs/eval-$S-$N-new/metrics.json"))
keys = ["bbox_AP50", "segm_AP50", "rec_acc50", "res_giou", "text_head_agreement", "chat_accuracy",
        "chat_description_f1", "find_name_acc", "find_f1", "old_class_AP_before", "old_class_AP_after"]
row = {k: round(m[k], 3) for k in keys if m.get(k) is not None} | {"new_AP50": round(n["bbox_AP50"], 3)}
print("$S", json.dumps(row))
PY
