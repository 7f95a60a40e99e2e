"""Data preprocessing (issue 3): raw datasets -> Megatron indexed datasets.

preprocess.py   the `preprocess` command and its pipeline (read -> encode -> pack -> write), output semantics
stage.py        the `train` pipeline's preprocess stage: decide / run / find_data_prefix
readers.py      input discovery and streaming reads (json, jsonl, parquet, csv, arrow, txt, folders)
handlers.py     records -> pretraining texts or normalized conversations (--map-keys)
templates.py    conversations -> rendered text + supervised spans (--prompt-type, `auto` = chat_template)
encode.py       chunk encoding in the main process or workers; label masks; truncation
fast_encode.py  batch tokenization (HF tokenizers, or gigatoken verified against it)
packing.py      greedy packing into seq_length bins
indexed.py      streaming .bin/.idx writer (byte-identical to IndexedDatasetBuilder), atomic output set
outputs.py      output names, fingerprint and summary json (no heavy imports: used by `plan`)
tokenizer.py    tokenizer facts shipped to workers
"""
