"""What every ``imagepca aws`` and ``imagepca emr`` command shares: errors the user can fix
end as one ``error:`` line and exit status 1; AWS clients come from one place (tests swap
it)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from imagepca.config import ParameterError

from .settings import AwsError, EmrSettings

Command = Callable[[argparse.Namespace], int]


def guard(command: Command) -> Command:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return command(args)
        # boto3's own (S3UploadFailedError wraps a refused transfer's ClientError).
        except (ClientError, BotoCoreError, Boto3Error) as error:
            print(f"error: AWS said: {error}", file=sys.stderr)
            return 1
        # AwsError, and what a run raises: Livy unreachable, a notebook failed. A parameter
        # refused exits 2, as with `imagepca run`.
        except (AwsError, RuntimeError, ValueError) as error:
            if isinstance(error, ParameterError):
                print(f"error: {error.option_message()}", file=sys.stderr)
                return 2
            print(f"error: {error}", file=sys.stderr)
            return 1

    return wrapped


def client(service: str, region: str | None) -> Any:
    return boto3.client(service, region_name=region)


def default_region() -> str | None:
    """The region a command given none uses: ``AWS_REGION``, else boto3's own default
    (``AWS_DEFAULT_REGION``, the profile's)."""
    return os.environ.get("AWS_REGION") or boto3.session.Session().region_name


def settings_path(args: argparse.Namespace) -> str | None:
    """``--settings``, else ``./emr_settings.json`` when it exists."""
    if args.settings is None and Path("emr_settings.json").exists():
        return "emr_settings.json"
    return args.settings


def region_only(args: argparse.Namespace) -> str:
    """The region alone, for a command that needs nothing else (``emr down`` stops the
    billing: a settings file without a subnet must not stand in its way)."""
    path = settings_path(args)
    region = args.region or (EmrSettings.load_raw(path).get("region") if path else None)
    region = region or default_region()
    if not region:
        raise AwsError("no region: pass --region (or set it in emr_settings.json, AWS_REGION)")
    return region


def command_group(
    subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str
) -> argparse._SubParsersAction:
    """``imagepca NAME``, whose commands go on the returned subparsers; without one it
    prints its help and exits 2."""
    parser = subparsers.add_parser(name, help=help, description=description)
    commands = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
    return commands
