{{- define "dkdm.name" -}}{{ .Release.Name }}-dkdm{{- end -}}
{{- define "dkdm.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag }}{{- end -}}
{{- define "dkdm.redisUrl" -}}
{{- if .Values.redis.enabled -}}redis://{{ include "dkdm.name" . }}-redis:6379/0{{- else -}}{{ .Values.redis.url }}{{- end -}}
{{- end -}}
{{- define "dkdm.secretName" -}}
{{- if .Values.apiToken -}}{{ include "dkdm.name" . }}-api{{- else -}}{{ .Values.existingSecret }}{{- end -}}
{{- end -}}
