# $1: 0 after removal, 1 after an upgrade: restart what runs on the new binary
# (systemd's %systemd_postun_with_restart). The state in /var/lib/natbinder stays, as RPM does.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart natbinder.service >/dev/null 2>&1 || :
    fi
fi
