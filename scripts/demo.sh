#!/usr/bin/env bash
# The main job on the embedded default: ingest the sample catalog, then match products against it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PRODSEARCH_STORE=${PRODSEARCH_STORE:-./prodsearch-data}
ps=.venv/bin/prodsearch
$ps ingest ingest/sample/catalog.csv --collection sample
echo "== match a store photo that is not in the catalog (image only)" >&2
$ps match --collection sample --image ingest/sample/queries/Tropicana-Apple-Juice.jpg --k 5
echo "== match a title (text + chars), with a typo" >&2
$ps match --collection sample --title "tropicanna aple juice" --k 5
echo "== match a title and an image, as JSON" >&2
$ps match --collection sample --title "Oatly oat drink" --image ingest/sample/queries/Oatly-Oat-Milk.jpg --k 3 --json
