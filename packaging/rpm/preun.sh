# $1: 0 on removal, 1 on upgrade. Removal stops the service, which removes its mappings
# (systemd's %systemd_preun).
if [ "$1" -eq 0 ] && [ -x /usr/bin/systemctl ]; then
    systemctl --no-reload disable --now natbinder.service >/dev/null 2>&1 || :
fi
