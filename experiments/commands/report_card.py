"""`plutao report-card` (being written)."""


def cmd_report_card(args) -> int:
    raise NotImplementedError
