# $1: 1 on install, 2 on upgrade. The operator group and the directories, then the unit: enabled on
# first install only if the distribution's presets say so (systemd's %systemd_post).
systemd-sysusers natbinder.conf || :
systemd-tmpfiles --create natbinder.conf || :
if [ "$1" -eq 1 ] && [ -x /usr/bin/systemctl ]; then
    systemctl --no-reload preset natbinder.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
