"""How error messages name the preprocessing options: the `preprocess` command names its flags; `train` names the
YAML keys its user wrote (canonical spelling). skip_bad_records is the whole fix to print."""

FLAGS = {"input": "--input", "tokenizer": "--tokenizer-name-or-path", "handler_name": "--handler-name",
         "prompt_type": "--prompt-type", "seq_length": "--seq-length", "pack": "--pack", "append_eod": "--append-eod",
         "json_keys": "--json-keys", "map_keys": "--map-keys", "workers": "--workers",
         "max_record_mb": "--max-record-mb", "skip_bad_records": "pass --skip-bad-records"}
YAML_KEYS = {"input": "dataset", "tokenizer": "model_name_or_path", "handler_name": "handler_name",
             "prompt_type": "prompt_type", "seq_length": "seq_len", "pack": "pack", "append_eod": "append_eod",
             "json_keys": "json_keys", "map_keys": "map_keys", "workers": "preprocess_workers",
             "max_record_mb": "max_record_mb", "skip_bad_records": "set skip_bad_records: true"}
