"""Issue API keys: ``python -m gateway.keys new --id team-a --rpm 60 --tpm 20000 --concurrency 8``.

``new`` prints the key once, on the first line of stdout, then the line to append to the keys file
(or, with ``--append FILE``, appends it there itself). Only the entry's digest reaches the
file, so the key exists nowhere else afterwards: hand it to its owner and let it scroll away.
The digest needs the gateway's pepper, read from the environment variable the gateway reads
(``EDGE_GATEWAY_KEY_PEPPER`` unless ``--pepper-env`` names another); ``pepper`` prints a fresh one.
After editing the file, reload the gateway's keys (SIGHUP or the admin API); no restart is needed.
"""

from __future__ import annotations

import argparse
import secrets
import sys

import msgspec

from gateway import auth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.keys", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    new = commands.add_parser("new", help="issue a key; print it once and its keys-file entry")
    new.add_argument("--id", required=True, help="public key id, shown in logs (letters, digits, _ . -)")
    new.add_argument("--role", choices=["user", "admin"], default="user")
    new.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    new.add_argument("--tpm", type=int, help="tokens per minute (default: unlimited)")
    new.add_argument("--concurrency", type=int, help="requests in flight at once (default: unlimited)")
    new.add_argument("--burst-requests", type=int, help="request bucket size (default: --rpm)")
    new.add_argument("--burst-tokens", type=int, help="token bucket size (default: --tpm)")
    new.add_argument("--class", dest="default_class", choices=["interactive", "batch"], default="interactive",
                     help="traffic class of requests that do not name one")
    new.add_argument("--models", help="comma-separated models the key may use (default: every model)")
    new.add_argument("--pepper-env", default=auth.PEPPER_ENV, help="environment variable holding the pepper")
    new.add_argument("--append", metavar="FILE", help="append the entry to this keys file")

    commands.add_parser("pepper", help="print a fresh random pepper for the environment variable")

    args = parser.parse_args(argv)
    if args.command == "pepper":
        print(secrets.token_urlsafe(32))
        return 0

    fields = {name: getattr(args, name) for name in (
        "id", "role", "rpm", "tpm", "concurrency", "burst_requests", "burst_tokens", "default_class")}
    if args.models:
        fields["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        record = msgspec.convert({k: v for k, v in fields.items() if v is not None}, auth.KeyRecord)
        pepper = auth.pepper_from_env(args.pepper_env)
    except (msgspec.ValidationError, auth.KeyFileError) as e:
        parser.error(str(e))
    key = auth.new_key(record.key_id)
    entry = auth.render_entry(record, auth.key_digest(pepper, key))
    print(key)
    if args.append:
        with open(args.append, "a") as f:
            f.write(entry)
        print(f"# entry for {record.key_id} appended to {args.append}; reload the gateway's keys",
              file=sys.stderr)
    else:
        print("# append this line to the keys file, then reload the gateway's keys:\n" + entry, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
