{{- define "ignis.tag" -}}
{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- define "ignis.controllerImage" -}}
{{ .Values.controller.image.repository | default (printf "%s/ignis-controller" .Values.image.registry) }}:{{ .Values.controller.image.tag | default (include "ignis.tag" .) }}
{{- end -}}
{{- define "ignis.agentImage" -}}
{{ .Values.agent.image.repository | default (printf "%s/ignis-agent" .Values.image.registry) }}:{{ .Values.agent.image.tag | default (include "ignis.tag" .) }}
{{- end -}}
{{- define "ignis.labels" -}}
app.kubernetes.io/part-of: ignis
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
