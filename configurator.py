"""
Config overrides, nanoGPT-style. Every script (train.py, sample.py, evaluate.py, prepare_data.py,
tokenize_all.py, bench.py) declares its settings as module-level variables, then applies the command line:

    python train.py config/audio.py --dtype=float32 --batch_size=32

Each bare argument is a Python file executed with the current settings in scope (it may read them); each
--key=value overrides one setting, the value parsed with ast.literal_eval (bare words stay strings);
--group.key=value (or a dict in a file) sets keys of a dict setting (train.py's masking), refusing unknown ones. Unknown
names and values of the wrong type are refused with the list of valid settings, so a typo never silently
trains the default.
"""
import ast
import os
import types


class ConfigError(ValueError):
    pass


def _valid_keys(config):
    return "valid settings: " + ", ".join(sorted(config))


def coerce(key, value, default):
    """Check (and where lossless, convert) a new value for a setting against its default's type."""
    if default is None or value is None:
        return value                                   # None-defaulted settings take any literal
    if isinstance(default, bool):                      # before int: bool is a subclass of int
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise ConfigError(f"--{key} expects True or False, got {value!r}")
    if isinstance(default, dict):   # a group of settings (train.py's masking): the keys given replace theirs
        if not isinstance(value, dict):
            raise ConfigError(f"--{key} expects a dict, got {value!r}")
        unknown = sorted(set(value) - set(default)) if default else []
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {key}; valid: {', '.join(sorted(default))}")
        return {**default, **value}
    # (the default's kind, the kinds a value may have, what the error calls it); a bool is never a number
    for kind, accepts, name in ((int, int, "an int"), (float, (int, float), "a float"), (str, str, "a string"),
                                ((tuple, list), (tuple, list), f"a tuple like {default!r}")):
        if isinstance(default, kind):
            if isinstance(value, accepts) and not isinstance(value, bool):
                return type(default)(value)
            raise ConfigError(f"--{key} expects {name}, got {value!r}")
    raise ConfigError(f"--{key}: cannot override a setting of type {type(default).__name__}")


def parse_value(text, default):
    """'3e-4' -> 3e-4, '(16, 256)' -> (16, 256), 'out-audio' -> 'out-audio' (for str settings)."""
    if isinstance(default, str):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        return value if isinstance(value, str) else text   # --out_dir=123 means the string '123'
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(default, (tuple, list)) and "," in text:   # --betas=0.9,0.95
            return tuple(ast.literal_eval(x) for x in text.split(","))
        return text   # coerce() decides (e.g. 'true' for a bool); else it reports the type error


def apply_file(config, path):
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} not found")
    scope = dict(config, __file__=path)   # a config may read a sibling file relative to itself
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    exec(code, scope)
    updates = {}
    for key, value in scope.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key not in config:
            raise ConfigError(f"{path}: unknown setting {key!r}; {_valid_keys(config)}")
        if value is not config[key]:
            updates[key] = coerce(key, value, config[key])
    return updates


def apply_overrides(config, args, verbose=True):
    """config: {name: default}; args: sys.argv[1:]. Returns the updated config (a new dict)."""
    config = dict(config)
    if any(a in ("-h", "--help") for a in args):
        print(help_text(config))
        raise SystemExit(0)
    for arg in args:
        if not arg.startswith("--"):
            if verbose:
                print(f"overriding config with {arg}")
            config.update(apply_file(config, arg))
            continue
        if "=" not in arg:
            raise ConfigError(f"{arg}: expected --key=value; {_valid_keys(config)}")
        key, text = arg[2:].split("=", 1)
        if "." in key:        # --group.key=value: one key of a group (a dict setting; None: a new dict)
            key, sub = key.split(".", 1)
            group = config.get(key, 0)
            if group is not None and not isinstance(group, dict):
                raise ConfigError(f"{arg}: {key!r} is not a group of settings; {_valid_keys(config)}")
            text = repr({sub: parse_value(text, (group or {}).get(sub))})
        if key not in config:
            raise ConfigError(f"unknown setting {key!r} in {arg}; {_valid_keys(config)}")
        config[key] = coerce(key, parse_value(text, config[key]), config[key])
        if verbose:
            print(f"overriding: {key} = {config[key]!r}")
    return config


def check_choices(config, choices):
    """Refuse a setting whose value is not one of its choices ({name: allowed values}), naming them."""
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise ConfigError(f"--{key}={config[key]!r}: choose one of {', '.join(map(str, allowed))}")


def help_text(config):
    """Every setting with its default, one per line: what --help prints."""
    import __main__
    doc = (getattr(__main__, "__doc__", None) or "").strip()
    lines = [doc, "", "settings (a config file and/or --key=value; each default shown):"] if doc else \
        ["settings (a config file and/or --key=value; each default shown):"]
    return "\n".join(lines + [f"  --{k}={v!r}" for k, v in sorted(config.items())])


def settings(namespace):
    """The overridable settings of a script: its public module-level ints, floats, bools, strings, tuples,
    lists, dicts and Nones (call with globals() before importing anything of those types under a plain name).
    UPPER_CASE names are constants, not settings."""
    kinds = (int, float, bool, str, tuple, list, dict, type(None))
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper() and isinstance(v, kinds)}
